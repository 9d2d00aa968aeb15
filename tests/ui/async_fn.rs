#[altpatch::alternative(avx2 => fetch_fast)]
async fn fetch() -> u64 {
    1
}

fn main() {}
