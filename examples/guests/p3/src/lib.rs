//! A WASI 0.3 command component: writes its arguments and environment to stdout through a
//! `stream<u8>`, then exits with the code in `EXIT_CODE` (0 when unset).

wit_bindgen::generate!({
    path: "wit",
    world: "flotilla:guest/command",
    generate_all,
});

use wasi::cli::{environment, exit, stdout};

struct Command;

impl exports::wasi::cli::run::Guest for Command {
    async fn run() -> Result<(), ()> {
        let mut text = format!("args: {}\n", environment::get_arguments().join(" "));
        let mut code = 0;
        for (name, value) in environment::get_environment() {
            if name == "EXIT_CODE" {
                code = value.parse().unwrap_or(255);
            }
            text.push_str(&format!("env: {name}={value}\n"));
        }
        let (mut writer, reader) = wit_stream::new();
        let written = stdout::write_via_stream(reader);
        let unwritten = writer.write_all(text.into_bytes()).await;
        drop(writer);
        if !unwritten.is_empty() || written.await.is_err() {
            return Err(());
        }
        if code != 0 {
            exit::exit_with_code(code);
        }
        Ok(())
    }
}

export!(Command);
