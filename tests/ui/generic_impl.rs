pub struct Wrapper<T>(T);

#[altpatch::alternative_impl]
impl<T: Copy> Wrapper<T> {
    #[altpatch::alternative(popcnt => Self::get_fast)]
    pub fn get(&self) -> T {
        self.0
    }
}

fn main() {}
