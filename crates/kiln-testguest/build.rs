//! The guest binary is linked with `linker.ld` (passed by kiln-testguest-builder); tell cargo
//! to relink when the script changes, since the flags naming it don't.
fn main() {
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=build.rs");
}
