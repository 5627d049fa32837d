//! A WASI 0.3 HTTP handler: answers every request `200` with `hello from WASI 0.3: <path>`,
//! the body written through a `stream<u8>` by a task that runs after `handle` has returned;
//! a path ending in `/trap` traps instead.

wit_bindgen::generate!({
    path: "wit",
    world: "flotilla:guest/http-service",
    generate_all,
});

use exports::wasi::http::handler::Guest;
use wasi::http::types::{ErrorCode, Fields, Request, Response};

struct Service;

impl Guest for Service {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let path = request.get_path_with_query().unwrap_or_default();
        if path.ends_with("/trap") {
            panic!("asked to trap by {path}");
        }
        let body = format!("hello from WASI 0.3: {path}\n").into_bytes();
        let headers = Fields::from_list(&[("content-type".into(), b"text/plain".to_vec())])
            .map_err(|e| ErrorCode::InternalError(Some(format!("{e:?}"))))?;
        let (mut contents, reader) = wit_stream::new();
        let (trailers, trailers_reader) = wit_future::new(|| Ok(None));
        let (response, _sent) = Response::new(headers, Some(reader), trailers_reader);
        wit_bindgen::spawn_local(async move {
            let _unwritten = contents.write_all(body).await;
            drop(contents);
            let _ = trailers.write(Ok(None)).await;
        });
        Ok(response)
    }
}

export!(Service);
