//! Handing freed heap back to the kernel after the agent's big transient
//! allocations (the first load of every Service, a re-read of the service
//! file, a read of every map for `/metrics`).
//!
//! glibc keeps freed memory in its arenas (one per thread that allocated),
//! so without this the resident size stays at the peak of the first load:
//! at 10,000 Services x 100,000 endpoints that is about twice what the
//! agent holds (`cargo xtask bench scale`). `malloc_trim` returns the free
//! pages of every arena; it takes about a millisecond and runs only after
//! such work. Arenas are also capped at two: each thread that parses or
//! reads maps would otherwise leave its own arena at its peak (measured at
//! 10,000 Services: peak RSS 142 MB with glibc's default, 95 MB with one
//! arena; the agent's threads mostly wait, so two cost no contention).

/// Caps glibc's arenas; call before the agent starts its threads.
pub fn limit_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a malloc parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Returns the heap's free pages to the kernel (glibc only; elsewhere the
/// allocator decides).
pub fn release_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks glibc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
