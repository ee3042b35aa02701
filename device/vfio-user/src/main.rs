//! Placeholder until the balloon lands.
fn main() {}
