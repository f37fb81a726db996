/// mimalloc instead of the C library's allocator: requests allocate on the runtime's threads
/// and are freed on the inference threads (and back), which glibc's arenas serialize on a lock
/// (BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(outpost::cli::main());
}
