//! `crdgen`: writes the CustomResourceDefinitions generated from the Rust types into the Helm
//! chart (`charts/flotilla/crds/`), or prints them with `--stdout`.
//!
//! `control-plane/tests/crds.rs` fails when the committed files drift from the types.

use std::process::ExitCode;

fn main() -> ExitCode {
    let to_stdout = std::env::args().any(|a| a == "--stdout");
    let crds = match flotilla_control_plane::kubernetes::crds::render() {
        Ok(crds) => crds,
        Err(error) => {
            eprintln!("crdgen: {error}");
            return ExitCode::FAILURE;
        }
    };
    for (file, yaml) in crds {
        if to_stdout {
            print!("---\n{yaml}");
            continue;
        }
        let path = flotilla_control_plane::kubernetes::crds::chart_dir().join(file);
        if let Err(error) = std::fs::write(&path, yaml) {
            eprintln!("crdgen: writing {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
