//! Rebuilds every committed guest binary under `examples/guests` from its source.

fn main() -> anyhow::Result<()> {
    for (path, wasm) in flotilla_tests::guests::build_all()? {
        std::fs::write(&path, &wasm)?;
        println!("{} ({} bytes)", path.display(), wasm.len());
    }
    Ok(())
}
