// TEMPORARY until kiln-testguest-builder lands.
fn main() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("..");
    std::fs::copy(
        root.join("target/testguest-build/release/kiln-testguest"),
        out.join("kiln-testguest.elf"),
    )
    .unwrap();
    std::fs::write(out.join("kiln-testguest.bzImage"), b"").unwrap();
}
