//! nodemesh kernel programs. Every decision they take comes from maps the agent fills;
//! the programs themselves only read the context, look up a map and act.
//!
//! Built for `bpfel-unknown-none` by agent/build.rs. `cargo build --workspace` also builds it
//! for the host, where it is an inert binary: that keeps clippy and rustc checking this code.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod connect;
mod dns;
mod inbound;
mod maps;
mod peername;
mod sockops;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier guarantees no panic path is reachable; this only satisfies no_std.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
