/* Helpers the HTTP guests share: send a response, or start one and stream its body.
 * Bindings: gen/http_guest.{c,h}, from `wit-bindgen c` (see build.sh). */
#ifndef FLOTILLA_RESPOND_H
#define FLOTILLA_RESPOND_H

#include <string.h>
#include "gen/http_guest.h"

typedef wasi_http_types_own_response_outparam_t outparam_t;

/* The bindings are generated with --no-object-file: the world's type information is embedded
 * from wit/ when the component is made, so the symbol that object file would define is empty. */
void __component_type_object_force_link_http_guest(void) {}

/* A response body being written: the body resource and its output stream. */
typedef struct {
    wasi_http_types_own_outgoing_body_t body;
    wasi_io_streams_own_output_stream_t stream;
} response_body_t;

/* Sends the status line and headers; the caller writes the body with write_body. */
static response_body_t start_response(outparam_t out, uint16_t status, const char *content_type) {
    wasi_http_types_own_fields_t headers = wasi_http_types_constructor_fields();
    wasi_http_types_field_name_t name;
    wasi_http_types_field_value_t value;
    http_guest_string_set(&name, "content-type");
    value.ptr = (uint8_t *)content_type;
    value.len = strlen(content_type);
    wasi_http_types_header_error_t header_err;
    wasi_http_types_method_fields_append(wasi_http_types_borrow_fields(headers), &name, &value,
                                         &header_err);

    wasi_http_types_own_outgoing_response_t response =
        wasi_http_types_constructor_outgoing_response(headers);
    wasi_http_types_borrow_outgoing_response_t borrowed =
        wasi_http_types_borrow_outgoing_response(response);
    wasi_http_types_method_outgoing_response_set_status_code(borrowed, status);
    response_body_t rb;
    wasi_http_types_method_outgoing_response_body(borrowed, &rb.body);
    wasi_http_types_method_outgoing_body_write(wasi_http_types_borrow_outgoing_body(rb.body),
                                               &rb.stream);

    wasi_http_types_result_own_outgoing_response_error_code_t result;
    result.is_err = false;
    result.val.ok = response;
    wasi_http_types_static_response_outparam_set(out, &result);
    return rb;
}

/* Writes bytes to the body; false once the client has gone. */
static bool write_body(response_body_t *rb, const void *data, size_t len) {
    const uint8_t *p = data;
    while (len > 0) {
        /* blocking-write-and-flush takes at most 4096 bytes per call. */
        size_t n = len < 4096 ? len : 4096;
        http_guest_list_u8_t chunk = {(uint8_t *)p, n};
        wasi_io_streams_stream_error_t err;
        if (!wasi_io_streams_method_output_stream_blocking_write_and_flush(
                wasi_io_streams_borrow_output_stream(rb->stream), &chunk, &err)) {
            wasi_io_streams_stream_error_free(&err);
            return false;
        }
        p += n;
        len -= n;
    }
    return true;
}

/* Ends the body: drops the stream, then finishes the body without trailers. */
static void finish_body(response_body_t *rb) {
    wasi_io_streams_output_stream_drop_own(rb->stream);
    wasi_http_types_error_code_t err;
    if (!wasi_http_types_static_outgoing_body_finish(rb->body, NULL, &err)) {
        wasi_http_types_error_code_free(&err);
    }
}

/* A whole response in one call. */
static void respond(outparam_t out, uint16_t status, const char *content_type, const char *body) {
    response_body_t rb = start_response(out, status, content_type);
    write_body(&rb, body, strlen(body));
    finish_body(&rb);
}

#endif
