/* The echo/JSON guest: a wasi:http/incoming-handler component that shows what a sandbox sees.
 * The last path segment picks the behaviour:
 *   .../echo        streams the request body back as it arrives
 *   .../count       requests this instance has handled: always 1, since every request gets a
 *                   fresh sandbox
 *   .../sleep?ms=N  answers after N milliseconds (default 1000)
 *   .../trap        traps (the ingress answers 500)
 *   .../spin        loops forever (cut at the request's CPU or time limit)
 *   .../fetch?URL   GETs URL (http or https) with wasi:http/outgoing-handler and answers with
 *                   its status and body, or 502 and the error code, e.g. "error 4" for
 *                   destination-ip-prohibited (the agent's egress rules refused it)
 *   anything else   a JSON document with the method, path, request count and a header count
 * Built by build.sh; node-agent/tests/examples.rs rebuilds it and fails if the committed
 * echo.wasm differs. */
#include <stdio.h>
#include <stdlib.h>
#include "respond.h"

/* Lives in the guest's linear memory: survives between requests only if an instance is reused. */
static unsigned requests_seen;

static const char *METHODS[] = {"GET",     "HEAD",    "POST",  "PUT",  "DELETE",
                                "CONNECT", "OPTIONS", "TRACE", "PATCH"};

static void echo_body(exports_wasi_http_incoming_handler_own_incoming_request_t request,
                      outparam_t out) {
    wasi_http_types_own_incoming_body_t body;
    if (!wasi_http_types_method_incoming_request_consume(
            wasi_http_types_borrow_incoming_request(request), &body)) {
        respond(out, 500, "text/plain", "request body already consumed\n");
        return;
    }
    wasi_http_types_own_input_stream_t in;
    wasi_http_types_method_incoming_body_stream(wasi_http_types_borrow_incoming_body(body), &in);
    /* Headers first, then each chunk as it arrives: the body streams both ways. */
    response_body_t rb = start_response(out, 200, "application/octet-stream");
    for (;;) {
        http_guest_list_u8_t chunk;
        wasi_io_streams_stream_error_t err;
        if (!wasi_io_streams_method_input_stream_blocking_read(
                wasi_io_streams_borrow_input_stream(in), 64 * 1024, &chunk, &err)) {
            wasi_io_streams_stream_error_free(&err); /* closed: the request body ended */
            break;
        }
        bool sent = write_body(&rb, chunk.ptr, chunk.len);
        http_guest_list_u8_free(&chunk);
        if (!sent) {
            break;
        }
    }
    wasi_io_streams_input_stream_drop_own(in);
    wasi_http_types_incoming_body_drop_own(body);
    finish_body(&rb);
}

/* GETs `url` and relays the answer: its status and body, or 502 "error N" with the
 * wasi:http error-code's case number. */
static void fetch(const char *url, outparam_t out) {
    const char *sep = url ? strstr(url, "://") : NULL;
    if (!sep) {
        respond(out, 400, "text/plain", "usage: fetch?http://host[:port]/path\n");
        return;
    }
    wasi_http_types_scheme_t scheme;
    scheme.tag = strncmp(url, "https", 5) == 0 ? WASI_HTTP_TYPES_SCHEME_HTTPS
                                                : WASI_HTTP_TYPES_SCHEME_HTTP;
    const char *authority = sep + 3;
    const char *path = strchr(authority, '/');
    http_guest_string_t authority_s = {(uint8_t *)authority,
                                       path ? (size_t)(path - authority) : strlen(authority)};
    http_guest_string_t path_s;
    http_guest_string_set(&path_s, path ? path : "/");

    wasi_http_types_own_outgoing_request_t request =
        wasi_http_types_constructor_outgoing_request(wasi_http_types_constructor_fields());
    wasi_http_types_borrow_outgoing_request_t borrowed =
        wasi_http_types_borrow_outgoing_request(request);
    wasi_http_types_method_outgoing_request_set_scheme(borrowed, &scheme);
    wasi_http_types_method_outgoing_request_set_authority(borrowed, &authority_s);
    wasi_http_types_method_outgoing_request_set_path_with_query(borrowed, &path_s);

    char text[4096];
    wasi_http_outgoing_handler_own_future_incoming_response_t future;
    wasi_http_outgoing_handler_error_code_t err;
    if (!wasi_http_outgoing_handler_handle(request, NULL, &future, &err)) {
        snprintf(text, sizeof text, "error %u\n", err.tag);
        wasi_http_types_error_code_free(&err);
        respond(out, 502, "text/plain", text);
        return;
    }
    wasi_http_types_borrow_future_incoming_response_t pending =
        wasi_http_types_borrow_future_incoming_response(future);
    wasi_io_poll_own_pollable_t ready =
        wasi_http_types_method_future_incoming_response_subscribe(pending);
    wasi_io_poll_method_pollable_block(wasi_io_poll_borrow_pollable(ready));
    wasi_io_poll_pollable_drop_own(ready);
    wasi_http_types_result_result_own_incoming_response_error_code_void_t result;
    wasi_http_types_method_future_incoming_response_get(pending, &result);
    wasi_http_types_future_incoming_response_drop_own(future);
    if (result.is_err || result.val.ok.is_err) {
        snprintf(text, sizeof text, "error %u\n", result.is_err ? 38 : result.val.ok.val.err.tag);
        wasi_http_types_result_result_own_incoming_response_error_code_void_free(&result);
        respond(out, 502, "text/plain", text);
        return;
    }
    wasi_http_types_own_incoming_response_t response = result.val.ok.val.ok;
    wasi_http_types_borrow_incoming_response_t answer =
        wasi_http_types_borrow_incoming_response(response);
    uint16_t status = wasi_http_types_method_incoming_response_status(answer);
    /* The first 4 KiB of the body: enough for what a test or a demo shows. */
    size_t used = 0;
    wasi_http_types_own_incoming_body_t body;
    if (wasi_http_types_method_incoming_response_consume(answer, &body)) {
        wasi_http_types_own_input_stream_t in;
        wasi_http_types_method_incoming_body_stream(wasi_http_types_borrow_incoming_body(body),
                                                    &in);
        while (used < sizeof text - 1) {
            http_guest_list_u8_t chunk;
            wasi_io_streams_stream_error_t stream_err;
            if (!wasi_io_streams_method_input_stream_blocking_read(
                    wasi_io_streams_borrow_input_stream(in), sizeof text - 1 - used, &chunk,
                    &stream_err)) {
                wasi_io_streams_stream_error_free(&stream_err);
                break;
            }
            memcpy(text + used, chunk.ptr, chunk.len);
            used += chunk.len;
            http_guest_list_u8_free(&chunk);
        }
        wasi_io_streams_input_stream_drop_own(in);
        wasi_http_types_incoming_body_drop_own(body);
    }
    text[used] = '\0';
    wasi_http_types_incoming_response_drop_own(response);
    respond(out, status, "text/plain", text);
}

static void sleep_ms(uint64_t ms) {
    wasi_clocks_monotonic_clock_own_pollable_t timer =
        wasi_clocks_monotonic_clock_subscribe_duration(ms * 1000000ull);
    wasi_io_poll_method_pollable_block(wasi_io_poll_borrow_pollable(timer));
    wasi_io_poll_pollable_drop_own(timer);
}

void exports_wasi_http_incoming_handler_handle(
    exports_wasi_http_incoming_handler_own_incoming_request_t request, outparam_t out) {
    requests_seen++;
    wasi_http_types_borrow_incoming_request_t req =
        wasi_http_types_borrow_incoming_request(request);

    http_guest_string_t path_with_query = {0};
    wasi_http_types_method_incoming_request_path_with_query(req, &path_with_query);
    char path[512];
    size_t len = path_with_query.len < sizeof path - 1 ? path_with_query.len : sizeof path - 1;
    memcpy(path, path_with_query.ptr, len);
    path[len] = '\0';
    http_guest_string_free(&path_with_query);
    char *query = strchr(path, '?');
    if (query) {
        *query++ = '\0';
    }
    const char *last = strrchr(path, '/');
    last = last ? last + 1 : path;

    if (strcmp(last, "echo") == 0) {
        echo_body(request, out);
    } else if (strcmp(last, "count") == 0) {
        char text[32];
        snprintf(text, sizeof text, "%u\n", requests_seen);
        respond(out, 200, "text/plain", text);
    } else if (strcmp(last, "sleep") == 0) {
        const char *ms = query ? strstr(query, "ms=") : NULL;
        sleep_ms(ms ? strtoull(ms + 3, NULL, 10) : 1000);
        respond(out, 200, "text/plain", "slept\n");
    } else if (strcmp(last, "fetch") == 0) {
        fetch(query, out);
    } else if (strcmp(last, "trap") == 0) {
        __builtin_trap();
    } else if (strcmp(last, "spin") == 0) {
        for (volatile unsigned long i = 0;; i++) {
        }
    } else {
        wasi_http_types_method_t method;
        wasi_http_types_method_incoming_request_method(req, &method);
        wasi_http_types_own_headers_t headers = wasi_http_types_method_incoming_request_headers(req);
        wasi_http_types_list_tuple2_field_name_field_value_t entries;
        wasi_http_types_method_fields_entries(wasi_http_types_borrow_fields(headers), &entries);
        char json[1024];
        snprintf(json, sizeof json,
                 "{\"method\":\"%.*s\",\"path\":\"%s\",\"requests\":%u,\"headers\":%zu}\n",
                 method.tag == WASI_HTTP_TYPES_METHOD_OTHER ? (int)method.val.other.len : 16,
                 method.tag == WASI_HTTP_TYPES_METHOD_OTHER ? (const char *)method.val.other.ptr
                                                            : METHODS[method.tag],
                 path, requests_seen, entries.len);
        wasi_http_types_list_tuple2_field_name_field_value_free(&entries);
        wasi_http_types_fields_drop_own(headers);
        wasi_http_types_method_free(&method);
        respond(out, 200, "application/json", json);
    }
    wasi_http_types_incoming_request_drop_own(request);
}
