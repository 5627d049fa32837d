//! A WASI 0.3 command component: writes its arguments and environment to stdout through a
//! `stream<u8>`, and, with `READ_FILE` set, the content of that file in its first preopened
//! directory (read through `wasi:filesystem@0.3.0`'s `read-via-stream`), then exits with the
//! code in `EXIT_CODE` (0 when unset).

wit_bindgen::generate!({
    path: "wit",
    world: "flotilla:guest/command",
    generate_all,
});

use wasi::cli::{environment, exit, stdout};
use wasi::filesystem::preopens;
use wasi::filesystem::types::{DescriptorFlags, OpenFlags, PathFlags};

struct Command;

impl exports::wasi::cli::run::Guest for Command {
    async fn run() -> Result<(), ()> {
        let mut text = format!("args: {}\n", environment::get_arguments().join(" "));
        let mut code = 0;
        let mut read_file = None;
        for (name, value) in environment::get_environment() {
            if name == "EXIT_CODE" {
                code = value.parse().unwrap_or(255);
            }
            if name == "READ_FILE" {
                read_file = Some(value.clone());
            }
            text.push_str(&format!("env: {name}={value}\n"));
        }
        if let Some(path) = read_file {
            text.push_str(&match read(&path).await {
                Ok(content) => format!("{path}: {content}\n"),
                Err(error) => format!("{path}: {error}\n"),
            });
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

/// The content of `path` in the first preopened directory, or why it could not be read.
async fn read(path: &str) -> Result<String, String> {
    let directories = preopens::get_directories();
    let (directory, mount) = directories.first().ok_or("no preopened directory")?;
    let file = directory
        .open_at(
            PathFlags::empty(),
            path.to_string(),
            OpenFlags::empty(),
            DescriptorFlags::READ,
        )
        .await
        .map_err(|e| format!("opening it in {mount}: {e:?}"))?;
    let (mut content, done) = file.read_via_stream(0);
    let bytes = content.collect().await;
    done.await.map_err(|e| format!("reading it: {e:?}"))?;
    String::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())
}

export!(Command);
