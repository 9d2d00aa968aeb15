//! Ratio tables printed at the end of a bench run, from criterion's saved estimates: machines
//! here are noisy, so absolute times move between runs, ratios measured side by side hold.

use std::path::PathBuf;

fn criterion_dir() -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    target.join("criterion")
}

/// Whether this run measures: `cargo bench` passes `--bench`; `cargo test --benches` does not,
/// and criterion then runs each bench once. Only a measuring run's saved estimates are its own.
pub fn measuring() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test" || a == "--list")
}

/// Mean time in ns of `group/id` from the run that just finished, if it was measured.
pub fn mean_ns(group: &str, id: &str) -> Option<f64> {
    if !measuring() {
        return None;
    }
    let path = criterion_dir()
        .join(group)
        .join(id)
        .join("new")
        .join("estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["mean"]["point_estimate"].as_f64()
}

/// Prints `id: mean, ratio to baseline (target)` for each row; rows without estimates (test
/// mode, filtered out) say so.
pub fn print_table(
    group: &str,
    per: f64,
    unit: &str,
    baseline: &str,
    rows: &[(&str, Option<f64>)],
) {
    println!("\n{group}: time per {unit}, ratio to `{baseline}`, and the target where one is set");
    let Some(base) = mean_ns(group, baseline) else {
        println!("  (not measured in this run: `cargo bench --bench {group}` measures)");
        return;
    };
    for (id, target) in rows {
        match mean_ns(group, id) {
            Some(t) => {
                let ratio = t / base;
                let verdict = match target {
                    Some(max) if ratio <= *max => format!("<= {max} ok"),
                    Some(max) => format!("<= {max} MISSED"),
                    None => String::new(),
                };
                println!("  {id:<34} {:>9.3} ns  {ratio:>6.2}x  {verdict}", t / per);
            }
            None => println!("  {id:<34} (not measured)"),
        }
    }
}
