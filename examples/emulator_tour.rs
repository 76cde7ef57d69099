//! A tour of the emulated accelerator. Under construction.
fn main() {
    println!("MXA-1 identity: {:#x}", accel_abi::regs::ID_VALUE);
}
