fn main() {
    eprintln!("vmd: no commands yet");
    std::process::exit(2);
}
