//! Writes the tests' tiny generated GGUF model: `tiny_model SEED PATH` (the Kotlin tests' fixtures).

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(seed), Some(path), None) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: tiny_model SEED PATH");
        std::process::exit(2);
    };
    let Ok(seed) = seed.parse::<u64>() else {
        eprintln!("tiny_model: the seed must be a number, not {seed:?}");
        std::process::exit(2);
    };
    mobillm_core::testkit::write_tiny_gguf(seed, path.as_ref());
}
