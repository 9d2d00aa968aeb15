pub struct Counter(u64);

pub trait Add {
    fn add(&mut self, x: u64) -> u64;
}

impl Add for Counter {
    #[altpatch::alternative(popcnt => Self::add_fast)]
    fn add(&mut self, x: u64) -> u64 {
        self.0 += x;
        self.0
    }
}

fn main() {}
