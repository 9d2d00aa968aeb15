//! `--check-report`: compares the sites found in the file with the site table of the runtime
//! report the same binary printed (`ALTPATCH_LOG=1`, or `println!("{report}")`).
//!
//! The report's table starts with a header line `site  location  address  candidates  chosen
//! how  why`; every following line is a site, columns separated by two or more spaces, until the
//! first line that is not one (a blank line ends it in the report's `Display`).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::inspect::Site;

/// One site line of a report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportSite {
    pub name: String,
    pub location: String,
    /// The run-time address.
    pub addr: u64,
}

/// Parses the first site table in `text`.
pub fn parse_report(text: &str) -> Result<Vec<ReportSite>, String> {
    let mut lines = text.lines();
    lines
        .by_ref()
        .find(|l| {
            let cols = columns(l);
            cols.len() >= 3 && cols[..3] == ["site", "location", "address"]
        })
        .ok_or("no site table found (a header line `site  location  address ...`)")?;
    let mut sites = Vec::new();
    for line in lines {
        let cols = columns(line);
        let addr = cols
            .get(2)
            .and_then(|a| a.strip_prefix("0x"))
            .and_then(|a| u64::from_str_radix(a, 16).ok());
        match (cols.len() >= 5, addr) {
            (true, Some(addr)) => sites.push(ReportSite {
                name: cols[0].to_string(),
                location: cols[1].to_string(),
                addr,
            }),
            _ => break,
        }
    }
    Ok(sites)
}

/// Columns separated by two or more spaces; leading and trailing spaces dropped.
fn columns(line: &str) -> Vec<&str> {
    line.trim()
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}

/// What `--check-report` found.
#[derive(Debug, Serialize)]
pub struct CheckResult {
    /// The report file.
    pub report: String,
    /// Sites in the report's table.
    pub report_sites: usize,
    /// Sites listed from the file.
    pub listed_sites: usize,
    /// `name file:line` of each site listed here more often than in the report.
    pub missing_from_report: Vec<String>,
    /// `name file:line` of each site in the report more often than listed here.
    pub missing_here: Vec<String>,
    /// Run-time address minus link-time address, when the two lists pair up in order and the
    /// difference is the same for every site (a PIE's load base; 0 for a non-PIE).
    pub load_base: Option<u64>,
    /// Why `load_base` is not given, when the lists otherwise match.
    pub load_base_note: Option<String>,
    pub ok: bool,
}

/// Compares `sites` with `report`: the same (name, file:line) pairs, each as often.
pub fn check(report_path: &str, report: &[ReportSite], sites: &[Site]) -> CheckResult {
    let key = |name: &str, location: &str| format!("{name} {location}");
    let mut counts: BTreeMap<String, i64> = BTreeMap::new();
    for s in sites {
        *counts
            .entry(key(s.display_name(), &s.location()))
            .or_default() += 1;
    }
    for r in report {
        *counts.entry(key(&r.name, &r.location)).or_default() -= 1;
    }
    let mut missing_from_report = Vec::new();
    let mut missing_here = Vec::new();
    for (k, n) in counts {
        let n_abs = n.unsigned_abs() as usize;
        if n > 0 {
            missing_from_report.extend(std::iter::repeat_n(k, n_abs));
        } else if n < 0 {
            missing_here.extend(std::iter::repeat_n(k, n_abs));
        }
    }
    let same_sites = missing_from_report.is_empty() && missing_here.is_empty();

    // Both lists are in link order; paired in order, every site must be shifted by one base.
    let paired = report.len() == sites.len()
        && report
            .iter()
            .zip(sites)
            .all(|(r, s)| r.name == s.display_name() && r.location == s.location());
    let bases: Vec<u64> = report
        .iter()
        .zip(sites)
        .map(|(r, s)| r.addr.wrapping_sub(s.vaddr))
        .collect();
    let (load_base, load_base_note) = if !paired {
        (
            None,
            Some("the lists are not in the same order".to_string()),
        )
    } else if bases.is_empty() {
        (None, Some("no sites".to_string()))
    } else if bases.iter().all(|&b| b == bases[0]) {
        (Some(bases[0]), None)
    } else {
        (
            None,
            Some("the sites are not all shifted by one load base".to_string()),
        )
    };
    let ok = same_sites && (load_base.is_some() || bases.is_empty());
    CheckResult {
        report: report_path.to_string(),
        report_sites: report.len(),
        listed_sites: sites.len(),
        missing_from_report,
        missing_here,
        load_base,
        load_base_note,
        ok,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "\
altpatch: 2 sites, 2 patched (2 written now), 0 unpatched; 1 pages, 0 serializations, writer mprotect, 1.7ms
cpu: vendor AuthenticAMD; features [sse3 popcnt]; no hypervisor
site                  location                          address  candidates      chosen  how        why
quickstart::popcount  examples/quickstart.rs:16  0x56337e4cbbb6  default,popcnt  popcnt  inline     popcnt holds
?                     ?:0                        0x56337e4cbd07                  default  unpatched  record not understood (version 2, kind None, 2 entries); left as built

results: popcount = 33
";

    #[test]
    fn report_table_lines_are_parsed_up_to_the_blank_line() {
        let sites = parse_report(REPORT).unwrap();
        assert_eq!(
            sites,
            [
                ReportSite {
                    name: "quickstart::popcount".into(),
                    location: "examples/quickstart.rs:16".into(),
                    addr: 0x5633_7e4c_bbb6,
                },
                ReportSite {
                    name: "?".into(),
                    location: "?:0".into(),
                    addr: 0x5633_7e4c_bd07,
                },
            ]
        );
    }

    #[test]
    fn text_without_a_site_table_is_an_error() {
        assert!(parse_report("altpatch: 0 sites\nhello\n").is_err());
        assert!(parse_report("").is_err());
    }

    #[test]
    fn an_empty_table_parses_to_no_sites() {
        let text = "site  location  address  candidates  chosen  how        why\n";
        assert_eq!(parse_report(text).unwrap(), []);
    }
}
