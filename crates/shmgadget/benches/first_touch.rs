//! First touch of a section (fault, lookup, open, map, retry) against an explicit
//! `open_section` of the same section, in the same run; then both again with 4,000 sections
//! registered in the domain, to show the fault path's lookup does not grow with the registry.
//!
//! Each iteration first unmaps the section from this process (outside the timed region), so
//! every measured access is a real first touch.
//!
//! Run: `cargo bench -p shmgadget --bench first_touch`.

use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use shmgadget::{__testing::forget_mapping, Domain, SectionOptions};

fn bench_pair(c: &mut Criterion, group: &str, domain: &Domain, name: &str) {
    let addr = domain.section_info(name).unwrap().address as *const u64;
    let mut g = c.benchmark_group(group);
    g.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    g.bench_function("explicit_open_map", |b| {
        b.iter_batched(
            || forget_mapping(domain, name).unwrap(),
            |()| drop(std::hint::black_box(domain.open_section(name).unwrap())),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("first_touch", |b| {
        b.iter_batched(
            || forget_mapping(domain, name).unwrap(),
            // SAFETY: `addr` is the first word of a live section of this domain; the read
            // faults and the handler maps the section.
            |()| unsafe { std::hint::black_box(addr.read_volatile()) },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn first_touch(c: &mut Criterion) {
    let domain = Domain::attach(&format!("bench-ft-{}", std::process::id())).unwrap();
    let opts = SectionOptions::new().transient();
    drop(domain.create_section("target", 64 * 1024, &opts).unwrap());
    bench_pair(c, "first_touch_1_section", &domain, "target");
    let others: Vec<String> = (0..3999).map(|i| format!("filler{i}")).collect();
    for n in &others {
        drop(domain.create_section(n, 4096, &opts).unwrap());
    }
    drop(domain.create_section("last", 64 * 1024, &opts).unwrap());
    bench_pair(c, "first_touch_4000_sections", &domain, "last");
    // The first section again, now with 4,000 neighbours mapped in this process: separates the
    // registry lookup (same entry as before) from process-wide costs (more kernel mappings).
    bench_pair(c, "first_touch_4000_sections_first_entry", &domain, "target");
    domain.detach().unwrap();
}

criterion_group!(benches, first_touch);
criterion_main!(benches);
