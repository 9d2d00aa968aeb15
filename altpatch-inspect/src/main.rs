//! `altpatch-inspect`: lists every altpatch site in a built ELF binary and flags the records the
//! runtime would refuse, the way the kernel's objtool checks its alternatives: run it on a release
//! (LTO) build to see that the linker kept and did not mangle any site.
//!
//! ```text
//! altpatch-inspect [--json] [--check-report REPORT] BINARY
//! ```
//!
//! Exit status: 0 when every record is fine (and the report matches), 1 when a record would be
//! refused, the file's site section is malformed or the report does not match, 2 on a usage or
//! I/O error. It reads the records with the layouts of the patch-core it is built with: build it
//! from the same altpatch version as the binary it inspects.

mod check;
mod image;
mod inspect;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use inspect::{Inspection, Status};
use patch_core::record::SITES_SECTION;

const USAGE: &str = "\
usage: altpatch-inspect [--json] [--check-report REPORT] BINARY

Lists every altpatch site in BINARY (an x86-64 ELF built with altpatch): name, file:line,
address, kind, the site's bytes and each candidate's predicate and block, disassembled, and
whether the runtime would refuse the record.

  --json                  print the same as JSON
  --check-report REPORT   also check that the sites listed are those of REPORT, the report
                          BINARY printed at run time (ALTPATCH_LOG=1 prints it to stderr)
  -h, --help              this text
  -V, --version           the version (it must match the altpatch version BINARY was built with)

exit status: 0 all fine, 1 a record would be refused or the report does not match, 2 usage or
I/O error";

struct Args {
    json: bool,
    report: Option<PathBuf>,
    binary: PathBuf,
}

enum Parsed {
    Run(Args),
    Exit(&'static str),
}

/// Parses the command line; paths may be any bytes, options must be UTF-8.
fn parse_args(mut args: impl Iterator<Item = OsString>) -> Result<Parsed, String> {
    let mut json = false;
    let mut report = None;
    let mut binary = None;
    let mut options_done = false;
    while let Some(arg) = args.next() {
        let text = arg.to_str().unwrap_or("");
        if options_done || !text.starts_with('-') || text == "-" {
            if binary.replace(PathBuf::from(arg)).is_some() {
                return Err("more than one BINARY given".into());
            }
            continue;
        }
        match text {
            "--" => options_done = true,
            "--json" => json = true,
            "-h" | "--help" => return Ok(Parsed::Exit(USAGE)),
            "-V" | "--version" => {
                return Ok(Parsed::Exit(concat!(
                    "altpatch-inspect ",
                    env!("CARGO_PKG_VERSION")
                )));
            }
            "--check-report" => {
                let path = args.next().ok_or("--check-report needs a REPORT file")?;
                report = Some(PathBuf::from(path));
            }
            _ => match text.strip_prefix("--check-report=") {
                Some(path) => report = Some(PathBuf::from(path)),
                None => return Err(format!("unknown option {text}")),
            },
        }
    }
    let binary = binary.ok_or("no BINARY given")?;
    Ok(Parsed::Run(Args {
        json,
        report,
        binary,
    }))
}

/// `writeln!` into a `String`, which cannot fail.
macro_rules! outln {
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($out, $($arg)*);
    }};
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args_os().skip(1)) {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Exit(text)) => return emit(&format!("{text}\n"), ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("altpatch-inspect: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let inspection = match run(&args) {
        Ok(inspection) => inspection,
        Err(e) => {
            eprintln!("altpatch-inspect: {e}");
            return ExitCode::from(2);
        }
    };
    let failed = inspection.refused() > 0
        || !inspection.problems.is_empty()
        || inspection.check.as_ref().is_some_and(|c| !c.ok);
    let status = ExitCode::from(u8::from(failed));
    if args.json {
        match serde_json::to_string_pretty(&inspection) {
            Ok(text) => emit(&format!("{text}\n"), status),
            Err(e) => {
                eprintln!("altpatch-inspect: cannot write JSON: {e}");
                ExitCode::from(2)
            }
        }
    } else {
        let mut text = String::new();
        print_table(&mut text, &inspection);
        emit(&text, status)
    }
}

/// Writes `text` to stdout; a closed pipe (`| head`) is the reader's choice and keeps `status`,
/// any other failure is an I/O error.
fn emit(text: &str, status: ExitCode) -> ExitCode {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => status,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => status,
        Err(e) => {
            eprintln!("altpatch-inspect: cannot write the output: {e}");
            ExitCode::from(2)
        }
    }
}

/// Reads and inspects the binary (and the report); errors are usage or I/O errors.
fn run(args: &Args) -> Result<Inspection, String> {
    let binary = args.binary.display().to_string();
    let data = std::fs::read(&args.binary).map_err(|e| format!("cannot read {binary}: {e}"))?;
    let report = match &args.report {
        Some(file) => {
            let path = file.display().to_string();
            let text =
                std::fs::read_to_string(file).map_err(|e| format!("cannot read {path}: {e}"))?;
            let sites = check::parse_report(&text).map_err(|e| format!("{path}: {e}"))?;
            Some((path, sites))
        }
        None => None,
    };
    let image = image::Image::parse(&data).map_err(|e| format!("{binary}: {e}"))?;
    let mut inspection = inspect::inspect(&binary, &image);
    if let Some((path, report)) = report {
        inspection.check = Some(check::check(&path, &report, &inspection.sites));
    }
    Ok(inspection)
}

fn print_table(out: &mut String, inspection: &Inspection) {
    let sites = &inspection.sites;
    let refused = inspection.refused();
    outln!(
        out,
        "{}: x86-64 {}, {} site record{} (layout v{}), {}",
        inspection.binary,
        if inspection.pie {
            "PIE (addresses are offsets from the load base)"
        } else {
            "executable"
        },
        sites.len(),
        if sites.len() == 1 { "" } else { "s" },
        inspection.record_version,
        match refused {
            0 => "none refused".to_string(),
            n => format!("{n} would be REFUSED at run time"),
        }
    );
    if inspection.sites_section.is_none() {
        outln!(
            out,
            "no {SITES_SECTION} section: built without altpatch sites, or the linker dropped them"
        );
    }
    for problem in &inspection.problems {
        outln!(out, "problem: {problem}");
    }
    if !sites.is_empty() {
        let width = |f: &dyn Fn(&inspect::Site) -> usize, min: usize| {
            sites.iter().map(f).max().unwrap_or(0).max(min)
        };
        let w_name = width(&|s| s.display_name().len(), 4);
        let w_loc = width(&|s| s.location().len(), 8);
        let w_addr = width(&|s| format!("{:#x}", s.vaddr).len(), 5);
        let w_kind = width(&|s| kind_text(s).len(), 4);
        out.push('\n');
        outln!(
            out,
            "{:w_name$}  {:w_loc$}  {:>w_addr$}  {:w_kind$}  {:>3}  status",
            "site",
            "location",
            "vaddr",
            "kind",
            "len"
        );
        for s in sites {
            let status = match (s.status, &s.reason) {
                (Status::Ok, _) => "ok".to_string(),
                (Status::Refused, reason) => {
                    let reason = reason.as_deref().unwrap_or("?");
                    format!(
                        "REFUSED: {}",
                        reason.strip_prefix("refused: ").unwrap_or(reason)
                    )
                }
            };
            outln!(
                out,
                "{:w_name$}  {:w_loc$}  {:>w_addr$}  {:w_kind$}  {:>3}  {status}",
                s.display_name(),
                s.location(),
                format!("{:#x}", s.vaddr),
                kind_text(s),
                s.len,
            );
        }
    }
    for s in sites {
        print_site(out, s);
    }
    if let Some(c) = &inspection.check {
        out.push('\n');
        print_check(out, c);
    }
}

fn kind_text(site: &inspect::Site) -> String {
    site.kind
        .map_or_else(|| format!("kind {}", site.kind_byte), str::to_string)
}

/// One site's bytes and candidates: `label  predicate  bytes  disassembly`.
fn print_site(out: &mut String, s: &inspect::Site) {
    out.push('\n');
    outln!(
        out,
        "#{} {}  {}  at {:#x}{}{}",
        s.index,
        s.display_name(),
        s.location(),
        s.vaddr,
        s.section
            .as_ref()
            .map_or_else(String::new, |n| format!(" in {n}")),
        s.file_offset
            .map_or_else(String::new, |o| format!(", file offset {o:#x}")),
    );
    let mut rows = vec![(
        "site".to_string(),
        "(as built)".to_string(),
        s.bytes
            .clone()
            .unwrap_or_else(|| "(not in the file)".into()),
        s.disassembly.join("; "),
    )];
    for c in &s.candidates {
        rows.push((
            c.name.clone().unwrap_or_else(|| "?".into()),
            c.predicate.clone().unwrap_or_else(|| "?".into()),
            match (&c.bytes, c.vaddr) {
                (Some(b), _) if b.is_empty() => "(no bytes)".into(),
                (Some(b), _) => b.clone(),
                (None, _) => "?".into(),
            },
            c.disassembly.join("; "),
        ));
    }
    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    let w2 = rows.iter().map(|r| r.2.len()).max().unwrap_or(0);
    for (label, predicate, bytes, asm) in rows {
        let line = format!("    {label:w0$}  {predicate:w1$}  {bytes:w2$}  {asm}");
        outln!(out, "{}", line.trim_end());
    }
    if let Some(reason) = &s.reason {
        outln!(out, "    REFUSED: {reason}");
    }
}

fn print_check(out: &mut String, c: &check::CheckResult) {
    outln!(
        out,
        "check against {}: {} sites in the report, {} listed here: {}",
        c.report,
        c.report_sites,
        c.listed_sites,
        if c.ok { "they match" } else { "MISMATCH" }
    );
    for k in &c.missing_from_report {
        outln!(out, "  listed here but not in the report: {k}");
    }
    for k in &c.missing_here {
        outln!(out, "  in the report but not listed here: {k}");
    }
    match (c.load_base, &c.load_base_note) {
        (Some(base), _) => outln!(out, "  every site is at its link-time address + {base:#x}"),
        (None, Some(note)) => outln!(out, "  load base: {note}"),
        (None, None) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Parsed, String> {
        parse_args(args.iter().map(OsString::from))
    }

    #[test]
    fn options_and_binary_are_parsed_in_any_order() {
        let Ok(Parsed::Run(a)) = parse(&["--check-report", "r.txt", "bin", "--json"]) else {
            panic!("not parsed");
        };
        assert!(a.json);
        assert_eq!(a.report, Some(PathBuf::from("r.txt")));
        assert_eq!(a.binary, PathBuf::from("bin"));
        let Ok(Parsed::Run(a)) = parse(&["--check-report=r", "--", "--json"]) else {
            panic!("not parsed");
        };
        assert!(!a.json);
        assert_eq!(a.binary, PathBuf::from("--json"));
    }

    #[test]
    fn bad_command_lines_are_errors() {
        for args in [
            &[][..],
            &["--json"],
            &["a", "b"],
            &["--frobnicate", "a"],
            &["a", "--check-report"],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
    }
}
