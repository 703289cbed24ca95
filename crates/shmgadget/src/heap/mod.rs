//! Shared heaps. The allocator itself ([`tlsf`]) works over a plain byte range; the heap binds
//! it to a section (in progress: see issue 5).

pub mod tlsf;
