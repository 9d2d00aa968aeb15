//! Valgrind: whether the program runs on its synthetic CPU, and telling it which code changed.
//!
//! Valgrind runs translations of the program's code, made when a block is first executed; with
//! its default `--smc-check=stack` it never notices that text outside the stack was rewritten,
//! so a site keeps running its old translation. Its documented client request
//! `VALGRIND_DISCARD_TRANSLATIONS` drops the translations of a range. Client requests are a
//! magic instruction sequence that does nothing on a real CPU (`rol rdi` by 3, 13, 61 and 51: 128
//! bits, so `rdi` is unchanged; then `xchg rbx, rbx`), written here as the `valgrind.h` macro
//! does, since the crates that wrap it (crabgrind) need valgrind's headers at build time and
//! panic at run time without them.

use std::sync::OnceLock;

const RUNNING_ON_VALGRIND: usize = 0x1001;
const DISCARD_TRANSLATIONS: usize = 0x1002;

/// `valgrind.h`'s `VALGRIND_DO_CLIENT_REQUEST_EXPR`: returns `default` on a real CPU.
#[inline(never)]
fn client_request(default: usize, request: [usize; 6]) -> usize {
    let result;
    // SAFETY: on a real CPU the sequence rotates rdi by a multiple of 64 bits (no change) and
    // swaps rbx with itself; it reads nothing but registers. Under valgrind it is a request
    // reading the 6 words at rax, which point at `request`, alive for the whole block.
    unsafe {
        core::arch::asm!(
            "rol rdi, 3",
            "rol rdi, 13",
            "rol rdi, 61",
            "rol rdi, 51",
            "xchg rbx, rbx",
            in("rax") request.as_ptr(),
            inout("rdx") default => result,
            out("rdi") _,
            options(nostack, readonly),
        );
    }
    result
}

/// Whether this process runs under valgrind (asked once).
pub fn running() -> bool {
    static RUNNING: OnceLock<bool> = OnceLock::new();
    *RUNNING.get_or_init(|| client_request(0, [RUNNING_ON_VALGRIND, 0, 0, 0, 0, 0]) != 0)
}

/// Makes valgrind drop its translations of `addr..addr + len`, so the next execution translates
/// the bytes written there. Nothing without valgrind.
pub fn discard_translations(addr: usize, len: usize) {
    if running() {
        client_request(0, [DISCARD_TRANSLATIONS, addr, len, 0, 0, 0]);
    }
}
