//! Links the shared library with `-z nodelete`: it installs a SIGSEGV handler (map on first
//! touch), so its code must stay mapped even if a program `dlclose`s it.

fn main() {
    // Linux only: mingw's ld has no `-z nodelete`. (On Windows a program must not
    // `FreeLibrary` shm_nt.dll while attached: its vectored exception handler lives in it.)
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
    }
}
