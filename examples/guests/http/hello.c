/* The HTTP hello world: a wasi:http/incoming-handler component that answers every request with
 * a greeting. Built by build.sh; node-agent/tests/examples.rs rebuilds it and fails if the
 * committed hello.wasm differs. */
#include "respond.h"

void exports_wasi_http_incoming_handler_handle(
    exports_wasi_http_incoming_handler_own_incoming_request_t request, outparam_t out) {
    wasi_http_types_incoming_request_drop_own(request);
    respond(out, 200, "text/plain; charset=utf-8", "Hello from Flotilla\n");
}
