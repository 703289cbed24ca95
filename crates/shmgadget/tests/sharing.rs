//! `Sharing`: the platform-neutral access classes become the objects' permission bits.
#![cfg(unix)]

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{assert_clean, object_path, small, unique_domain};
use shmgadget::{Domain, DomainOptions, SectionOptions, Sharing};

const MIB: u64 = 1 << 20;

fn mode_of(file: &str) -> u32 {
    std::fs::metadata(object_path(file)).unwrap().permissions().mode() & 0o777
}

#[test]
fn sharing_classes_become_the_objects_permission_bits() {
    let domain = unique_domain("sharing");
    let opts = DomainOptions { sharing: Sharing::group(), ..small(64 * MIB) };
    let d = Domain::attach_with(&domain, &opts).unwrap();
    assert_eq!(mode_of(&format!("shmgadget.{domain}:registry")), 0o660, "the registry is shared with the group");
    let cases = [
        ("dflt", SectionOptions::new(), 0o660),
        ("own", SectionOptions::new().sharing(Sharing::owner_only()), 0o600),
        ("grp", SectionOptions::new().sharing(Sharing::group()), 0o660),
        ("all", SectionOptions::new().sharing(Sharing::everyone()), 0o666),
        ("posix", SectionOptions::new().mode(0o640), 0o640),
    ];
    for (name, opts, want) in cases {
        let s = d.create_section(name, 4096, &opts.transient()).unwrap();
        let info = s.info();
        assert_eq!(info.mode, want, "{name}: recorded");
        assert_eq!(mode_of(&info.object), want, "{name}: on the object");
    }
    d.detach().unwrap();
    assert_clean(&domain);
}
