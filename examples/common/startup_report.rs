//! Shared by the startup examples: with `STARTUP_REPORT=1`, one line saying what the load-time
//! apply took (`benches/patching.rs` reads it).

pub fn print_if_asked() {
    if std::env::var_os("STARTUP_REPORT").is_some() {
        let report = altpatch::applied_report().expect("applied at load");
        println!(
            "apply_ns={} sites={} patched={}",
            report.elapsed.as_nanos(),
            report.sites.len(),
            report.patched()
        );
    }
}
