//! Two semver-incompatible copies of altpatch linked into one program, for real: this test
//! writes a second copy of the crate family (`altpatch`, `patch-core`, `patch-macros`) with the
//! next incompatible version (0.2 for 0.1) under the target directory, builds a program that
//! depends on both (`tests/fixtures/two_versions_app.rs`; the copy as the renamed dependency
//! `altpatch2`) with cargo, offline, in this test's profile, and runs it in a child with a time
//! bound. The program toggles one static key of each copy from two threads at once while
//! workers run both branches and an `#[alternative]` site of each copy; it asserts no
//! wrong-branch result, no refused toggle, no text page left `rwxp`, that each copy's report
//! lists only its own sites, and that the program's own traps still reach its own handler.
//!
//! The copy and its build live in `<target>/two-versions/` (the target directory this test
//! binary is in, so `CARGO_TARGET_DIR` and the frame-pointer run's directory are respected) and
//! are reused: files are rewritten only when they change, so a second run builds incrementally.
//! `ALTPATCH_TWO_VERSIONS_TOGGLES` / `ALTPATCH_TWO_VERSIONS_SECONDS` make the run longer.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::child::run_command_bounded;

/// The crates of the family copied, as directories under the repository (the root package is
/// `.`).
const FAMILY: [&str; 3] = [".", "patch-core", "patch-macros"];

/// `(major, minor)` of this repository's altpatch.
fn this_version() -> (u64, u64) {
    (
        env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap(),
        env!("CARGO_PKG_VERSION_MINOR").parse().unwrap(),
    )
}

/// The next version cargo treats as incompatible with `(major, minor)`.
fn next_incompatible((major, minor): (u64, u64)) -> (u64, u64) {
    if major == 0 {
        (0, minor + 1)
    } else {
        (major + 1, 0)
    }
}

/// The semver-compatible tag in section names: `v0_1`.
fn tag((major, minor): (u64, u64)) -> String {
    format!("v{major}_{minor}")
}

/// Writes `contents` to `path` unless it already holds them (an unchanged file keeps its mtime,
/// so cargo does not rebuild).
fn write_if_changed(path: &Path, contents: &[u8]) {
    if std::fs::read(path).is_ok_and(|old| old == contents) {
        return;
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `text` with every `from` replaced by `to`, checking there was at least one.
fn replace_some(text: &str, from: &str, to: &str, what: &str) -> String {
    assert!(text.contains(from), "{what}: no `{from}` to rewrite");
    text.replace(from, to)
}

/// A crate manifest of the family with its version, and the versions of its dependencies on the
/// family, moved from `old` to `new` (`"0.1.0"` to `"0.2.0"`). The root manifest keeps only what
/// building the library needs: its own workspace of the two other crates, its features and
/// dependencies (no dev-dependencies, benches or examples, which are not copied).
fn rewrite_manifest(text: &str, root: bool, old: &str, new: &str) -> String {
    let (old_version, new_version) = (format!("\"{old}\""), format!("\"{new}\""));
    let mut out = String::new();
    let mut section = String::new();
    let mut package_versions = 0;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            section = trimmed.to_owned();
        }
        let keep = !root
            || !(section == "[dev-dependencies]"
                || section.starts_with("[[bench")
                || section.starts_with("[[example")
                || section.starts_with("[[test"));
        if !keep {
            continue;
        }
        let line = if section == "[package]" && trimmed.starts_with("version") {
            package_versions += 1;
            replace_some(line, &old_version, &new_version, "package version")
        } else if root && section == "[workspace]" && trimmed.starts_with("members") {
            "members = [\"patch-core\", \"patch-macros\"]".to_owned()
        } else if ["patch-core", "patch-macros", "altpatch"]
            .iter()
            .any(|c| trimmed.starts_with(&format!("{c} ")) || trimmed.starts_with(&format!("{c}=")))
        {
            // A dependency on the family: its version requirement, if it has one, moves too.
            line.replace(&old_version, &new_version)
        } else {
            line.to_owned()
        };
        out.push_str(&line);
        out.push('\n');
    }
    assert_eq!(package_versions, 1, "one package version in:\n{text}");
    out
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Writes the next incompatible version of the crate family into `dest`: manifests with the new
/// version, sources copied with the section names moved to the new version's tag. patch-macros
/// derives its section names from its own version; patch-core writes them as literals (its
/// `__sites_section!`/`__repl_section!` are expanded in other crates, where `env!` would read
/// those crates' versions), so a release rewrites them, as here; patch-core's unit test
/// `section_names_carry_this_crates_semver_compatible_version` holds it to that.
fn write_copy(repo: &Path, dest: &Path) {
    let (old, new) = (this_version(), next_incompatible(this_version()));
    let old_full = format!("{}.{}.{}", old.0, old.1, env!("CARGO_PKG_VERSION_PATCH"));
    let new_full = format!("{}.{}.0", new.0, new.1);
    let (old_tag, new_tag) = (tag(old), tag(new));
    let mut section_literals = 0;
    for krate in FAMILY {
        let (from, to) = (repo.join(krate), dest.join(krate));
        let manifest = std::fs::read_to_string(from.join("Cargo.toml")).unwrap();
        assert!(
            manifest.contains(&format!("version = \"{old_full}\"")),
            "{krate} is not at version {old_full}: the family shares one version"
        );
        let manifest = rewrite_manifest(&manifest, krate == ".", &old_full, &new_full);
        write_if_changed(&to.join("Cargo.toml"), manifest.as_bytes());
        for file in files_under(&from.join("src")) {
            let relative = file.strip_prefix(&from).unwrap();
            let mut bytes = std::fs::read(&file).unwrap();
            if file.extension().is_some_and(|e| e == "rs") {
                let text = String::from_utf8(bytes).unwrap();
                for what in ["sites", "repl"] {
                    let literal = format!("\"altpatch_{what}_{old_tag}\"");
                    section_literals += text.matches(&literal).count();
                }
                let text = text
                    .replace(
                        &format!("altpatch_sites_{old_tag}"),
                        &format!("altpatch_sites_{new_tag}"),
                    )
                    .replace(
                        &format!("altpatch_repl_{old_tag}"),
                        &format!("altpatch_repl_{new_tag}"),
                    );
                bytes = text.into_bytes();
            }
            write_if_changed(&to.join(relative), &bytes);
        }
    }
    assert_eq!(
        section_literals, 2,
        "patch-core's two section-name literals (record.rs) were not found: how does a copy \
         name its sections now?"
    );
}

/// A TOML basic string holding `path`.
fn toml_path(path: &Path) -> String {
    let text = path.to_str().expect("a UTF-8 path");
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Writes the program linking both copies into `app`.
fn write_app(repo: &Path, copy: &Path, app: &Path) {
    let manifest = format!(
        "# Written by tests/two_versions_linked.rs.\n\
         [package]\n\
         name = \"two-versions-app\"\n\
         version = \"0.0.0\"\n\
         edition = \"2024\"\n\
         publish = false\n\n\
         [dependencies]\n\
         altpatch = {{ path = {} }}\n\
         altpatch2 = {{ package = \"altpatch\", path = {} }}\n\
         libc = \"0.2\"\n\n\
         # A workspace of its own, outside the repository's.\n\
         [workspace]\n",
        toml_path(repo),
        toml_path(copy)
    );
    write_if_changed(&app.join("Cargo.toml"), manifest.as_bytes());
    let main = std::fs::read(repo.join("tests/fixtures/two_versions_app.rs")).unwrap();
    write_if_changed(&app.join("src/main.rs"), &main);
    // The repository's lock file: the same registry versions, nothing to fetch. Cargo adds the
    // copy's packages to it; the registry versions stay.
    let lock = std::fs::read(repo.join("Cargo.lock")).unwrap();
    let app_lock = app.join("Cargo.lock");
    let stamp = app.join("Cargo.lock.from-repository");
    if !std::fs::read(&stamp).is_ok_and(|old| old == lock) {
        write_if_changed(&app_lock, &lock);
        write_if_changed(&stamp, &lock);
    }
}

/// This test binary's target directory and profile directory name (`debug`, `release`).
fn target_and_profile() -> (PathBuf, String) {
    let exe = std::env::current_exe().unwrap();
    // <target>/<profile>/deps/<test>
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let profile = profile_dir
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    (profile_dir.parent().unwrap().to_path_buf(), profile)
}

/// Builds the program with cargo in this test's profile; returns its path and the build time.
fn build_app(app: &Path, target: &Path, profile: &str) -> (PathBuf, Duration) {
    let mut cargo = Command::new(env!("CARGO"));
    cargo.arg("build").arg("--offline").arg("--manifest-path");
    cargo.arg(app.join("Cargo.toml"));
    match profile {
        "debug" => cargo.args(["--profile", "dev"]),
        other => cargo.args(["--profile", other]),
    };
    // Its own target directory, whatever this run's is (`RUSTFLAGS` is inherited: the build
    // matches this one's, frame pointers included).
    cargo
        .env("CARGO_TARGET_DIR", target)
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .env_remove("CARGO_MANIFEST_DIR")
        .env_remove("CARGO_MANIFEST_PATH")
        .env_remove("CARGO_PRIMARY_PACKAGE")
        .env_remove("CARGO_CRATE_NAME");
    let started = Instant::now();
    let out = cargo.output().expect("cannot run cargo");
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "building the program linking both copies failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (target.join(profile).join("two-versions-app"), took)
}

/// `key=value` fields of the program's line for `copy`.
fn field(stdout: &str, copy: &str, key: &str) -> u64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&format!("copy {copy}: toggles=")))
        .unwrap_or_else(|| panic!("no line for copy {copy} in:\n{stdout}"));
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .parse()
        .unwrap()
}

#[test]
fn two_copies_toggle_at_once_each_on_its_own_sites() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (target, profile) = target_and_profile();
    let root = target.join("two-versions");
    let (copy, app) = (root.join("altpatch-next"), root.join("app"));
    write_copy(repo, &copy);
    write_app(repo, &copy, &app);
    let (program, build) = build_app(&app, &root.join("target"), &profile);
    eprintln!("built {} in {build:.1?}", program.display());

    // The program bounds its toggling (20 s unless this says otherwise); the rest of the bound
    // is for starting, checking and a loaded machine.
    let seconds: u64 = std::env::var("ALTPATCH_TWO_VERSIONS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let limit = Duration::from_secs(seconds * 2 + 60);
    let run = run_command_bounded(Command::new(&program), limit);
    run.assert_success("the program linking two copies of altpatch");
    println!("{}", run.stdout);
    let stdout = &run.stdout;
    let next = tag(next_incompatible(this_version()));
    assert!(
        stdout.contains(&format!(
            "sections: altpatch_sites_{} altpatch_sites_{next}",
            tag(this_version())
        )),
        "{stdout}"
    );
    for copy in ["0.1", "0.2"] {
        // The program asserts these too; read back, they show the run was what it claims.
        assert!(field(stdout, copy, "toggles") >= 100, "{stdout}");
        assert!(field(stdout, copy, "checked") > 0, "{stdout}");
        assert_eq!(field(stdout, copy, "wrong"), 0, "{stdout}");
        assert_eq!(field(stdout, copy, "mix_wrong"), 0, "{stdout}");
        assert_eq!(field(stdout, copy, "refused"), 0, "{stdout}");
    }
    assert!(stdout.contains("user traps: 2"), "{stdout}");
    assert!(stdout.contains("TWO VERSIONS OK"), "{stdout}");
}
