//! Links the shared library with `-z nodelete`: it installs a SIGSEGV handler (map on first
//! touch), so its code must stay mapped even if a program `dlclose`s it.

fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
}
