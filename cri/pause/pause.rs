//! corral's pause process: PID 1 of every pod sandbox that runs without a
//! sandbox image.
//!
//! It holds the pod's namespaces open, reaps every orphan that the shared
//! PID namespace hands it, and exits 0 on SIGTERM or SIGINT. It runs in a
//! rootfs that holds nothing but this binary, so it is a static executable
//! with no libc at all: a few raw system calls, its own `_start`, no
//! allocation. That makes it about 1.5 KB on disk and ~20 KB resident,
//! where a static glibc build is ~700 KB (~600 KB resident) and a std one
//! ~1.2 MB (~1.1 MB resident): one runs in every pod on the node.
//!
//! No signal handler is installed. The three signals are blocked and taken
//! synchronously with `rt_sigtimedwait`, so nothing runs in signal context.
//! Blocking also matters for a namespace's init: the kernel drops a signal
//! with the default disposition sent to it, but never a blocked one.
//!
//! Built by `cri/build.rs` with bare rustc; no crates, not even libc.

#![no_std]
#![no_main]

const SIGINT: usize = 2;
const SIGTERM: usize = 15;
const SIGCHLD: usize = 17;

/// The kernel's sigset: one bit per signal, bit `n - 1` for signal `n`.
const WAITED: u64 = bit(SIGINT) | bit(SIGTERM) | bit(SIGCHLD);

const SIG_BLOCK: usize = 0;
const WNOHANG: usize = 1;

extern "C" fn pause_main() -> ! {
    // Without the block, SIGCHLD and SIGTERM would be discarded (PID 1,
    // default disposition) instead of queued for rt_sigtimedwait.
    sys::rt_sigprocmask(SIG_BLOCK, &WAITED);
    loop {
        reap_all();
        match sys::rt_sigtimedwait(&WAITED) {
            SIGTERM | SIGINT => sys::exit_group(0),
            // SIGCHLD, or EINTR: reap at the top of the loop. Several exits
            // can merge into one pending SIGCHLD, hence reaping until none.
            _ => {}
        }
    }
}

/// Collects every child that has exited, without blocking.
fn reap_all() {
    while sys::wait4_any(WNOHANG) > 0 {}
}

const fn bit(signal: usize) -> u64 {
    1 << (signal - 1)
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    sys::exit_group(2)
}

/// The system calls pause makes, over the architecture's calling convention.
mod sys {
    use super::arch::{syscall4, EXIT_GROUP, RT_SIGPROCMASK, RT_SIGTIMEDWAIT, WAIT4};
    use core::mem::MaybeUninit;

    const SIGSET_SIZE: usize = core::mem::size_of::<u64>();

    pub fn rt_sigprocmask(how: usize, set: &u64) {
        // Cannot fail with a valid `how` and a readable set.
        unsafe {
            syscall4(
                RT_SIGPROCMASK,
                how,
                set as *const u64 as usize,
                0,
                SIGSET_SIZE,
            )
        };
    }

    /// The signal taken, or a negative errno (as usize, so never a signal).
    pub fn rt_sigtimedwait(set: &u64) -> usize {
        let mut info = MaybeUninit::<[u64; 16]>::uninit();
        let set = set as *const u64 as usize;
        let info = info.as_mut_ptr() as usize;
        unsafe { syscall4(RT_SIGTIMEDWAIT, set, info, 0, SIGSET_SIZE) as usize }
    }

    /// `wait4(-1, NULL, options, NULL)`: a pid, 0, or a negative errno.
    pub fn wait4_any(options: usize) -> isize {
        unsafe { syscall4(WAIT4, usize::MAX, 0, options, 0) }
    }

    pub fn exit_group(code: usize) -> ! {
        loop {
            unsafe { syscall4(EXIT_GROUP, code, 0, 0, 0) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod arch {
    use core::arch::{asm, global_asm};

    // The kernel enters with argc at (%rsp); pause needs none of it, the ABI
    // only wants a 16-byte aligned stack and no frame pointer.
    global_asm!(
        ".globl _start",
        "_start:",
        "xor ebp, ebp",
        "and rsp, -16",
        "call {main}",
        "ud2",
        main = sym super::pause_main,
    );

    pub const RT_SIGPROCMASK: usize = 14;
    pub const WAIT4: usize = 61;
    pub const RT_SIGTIMEDWAIT: usize = 128;
    pub const EXIT_GROUP: usize = 231;

    pub unsafe fn syscall4(nr: usize, a: usize, b: usize, c: usize, d: usize) -> isize {
        let ret: isize;
        asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a, in("rsi") b, in("rdx") c, in("r10") d,
            lateout("rcx") _, lateout("r11") _,
            options(nostack),
        );
        ret
    }
}

#[cfg(target_arch = "aarch64")]
mod arch {
    use core::arch::{asm, global_asm};

    // sp is 16-byte aligned at entry; fp and lr are cleared so that a
    // backtrace ends here.
    global_asm!(
        ".globl _start",
        "_start:",
        "mov x29, #0",
        "mov x30, #0",
        "bl {main}",
        "brk #0",
        main = sym super::pause_main,
    );

    pub const EXIT_GROUP: usize = 94;
    pub const RT_SIGPROCMASK: usize = 135;
    pub const RT_SIGTIMEDWAIT: usize = 137;
    pub const WAIT4: usize = 260;

    pub unsafe fn syscall4(nr: usize, a: usize, b: usize, c: usize, d: usize) -> isize {
        let ret: isize;
        asm!(
            "svc #0",
            in("x8") nr,
            inlateout("x0") a as isize => ret,
            in("x1") b, in("x2") c, in("x3") d,
            options(nostack),
        );
        ret
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("corral's pause process has system calls for x86_64 and aarch64 only");
