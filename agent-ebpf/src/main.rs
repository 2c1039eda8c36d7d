//! nodemesh kernel programs. Every decision they take comes from maps the agent fills;
//! the programs themselves only read the context, look up a map and act.
#![no_std]
#![no_main]

mod connect;
mod maps;
mod peername;
mod sockops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier guarantees no panic path is reachable; this only satisfies no_std.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
