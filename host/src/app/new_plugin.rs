//! `flowhost new NAME`: write a plugin crate that builds with
//! `cargo build --target wasm32-wasip2` and `cargo component build`, unit-tests
//! natively with `FakeHost`, and serves as `/NAME`.
//!
//! The crate depends on `flowhost-sdk` by path (the SDK is not on crates.io):
//! `--sdk-path` if given, else the `sdk/` of the flowhost checkout the current
//! folder is in, else that of the checkout this binary was built from. When the
//! SDK's workspace has a `Cargo.lock`, it is copied so the new crate resolves the
//! same dependency versions (and builds offline from a warm cargo cache). Never
//! overwrites anything: the target folder must not exist.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::app::cli::NewArgs;

const CARGO_TOML: &str = include_str!("../../templates/plugin/Cargo.toml.tmpl");
const LIB_RS: &str = include_str!("../../templates/plugin/lib.rs.tmpl");
const GITIGNORE: &str = include_str!("../../templates/plugin/gitignore.tmpl");

/// What was written, for the command's output.
#[derive(Debug, serde::Serialize)]
pub struct Created {
    pub dir: PathBuf,
    pub sdk_path: PathBuf,
    pub route: String,
    /// File name of the built component (`NAME` with `-` → `_`).
    pub artifact: String,
}

/// Names become the crate, the plugin name and the route: `[a-z][a-z0-9-]*`.
pub fn check_name(name: &str) -> Result<()> {
    let ok = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if !ok {
        bail!("plugin name {name:?} must be 1-64 characters of a-z, 0-9 and '-', starting with a letter");
    }
    crate::plugins::manifest::check_route(&format!("/{name}"))
}

/// The SDK to depend on (see the module doc for the order).
pub fn find_sdk(explicit: Option<&Path>, cwd: &Path) -> Result<PathBuf> {
    let is_sdk = |dir: &Path| {
        std::fs::read_to_string(dir.join("Cargo.toml")).is_ok_and(|t| t.contains("name = \"flowhost-sdk\""))
    };
    if let Some(path) = explicit {
        if !is_sdk(path) {
            bail!("--sdk-path {}: no flowhost-sdk Cargo.toml there", path.display());
        }
        return path.canonicalize().with_context(|| format!("resolving {}", path.display()));
    }
    for dir in cwd.ancestors() {
        if is_sdk(&dir.join("sdk")) {
            return Ok(dir.join("sdk").canonicalize()?);
        }
    }
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
    if is_sdk(&built_from) {
        return Ok(built_from.canonicalize()?);
    }
    bail!("cannot find flowhost-sdk: run inside a flowhost checkout, or pass --sdk-path /path/to/flowhost/sdk")
}

/// Write the crate.
pub fn create(args: &NewArgs, cwd: &Path) -> Result<Created> {
    check_name(&args.name)?;
    let dir = args.path.clone().unwrap_or_else(|| cwd.join(&args.name));
    if dir.exists() {
        bail!("{} already exists; choose another name or --path", dir.display());
    }
    let sdk = find_sdk(args.sdk_path.as_deref(), cwd)?;
    let sdk_text = sdk.to_str().context("the SDK path is not UTF-8")?.replace('\\', "/");
    let fill = |template: &str| {
        template
            .replace("{{name}}", &args.name)
            .replace("{{prefix}}", &args.name.replace('-', "_"))
            .replace("{{sdk_path}}", &sdk_text)
    };
    std::fs::create_dir_all(dir.join("src")).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("Cargo.toml"), fill(CARGO_TOML))?;
    std::fs::write(dir.join("src/lib.rs"), fill(LIB_RS))?;
    std::fs::write(dir.join(".gitignore"), GITIGNORE)?;
    if let Some(lock) = sdk.parent().map(|w| w.join("Cargo.lock")).filter(|l| l.is_file()) {
        std::fs::copy(&lock, dir.join("Cargo.lock")).context("copying the SDK workspace's Cargo.lock")?;
    }
    Ok(Created { dir, sdk_path: sdk, route: format!("/{}", args.name), artifact: format!("{}.wasm", args.name.replace('-', "_")) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_crate_plugin_and_route_names() {
        assert!(check_name("sdxl-turbo").is_ok());
        for bad in ["", "Sdxl", "9lives", "a_b", "a-", "health", "a/b"] {
            assert!(check_name(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn writes_a_crate_depending_on_the_sdk_and_never_overwrites() {
        let out = tempfile::tempdir().unwrap();
        let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
        let args = NewArgs { name: "sdxl-turbo".into(), path: None, sdk_path: Some(sdk.clone()) };
        let created = create(&args, out.path()).unwrap();
        let toml = std::fs::read_to_string(created.dir.join("Cargo.toml")).unwrap();
        assert!(toml.contains(&format!("flowhost-sdk = {{ path = \"{}\" }}", sdk.canonicalize().unwrap().display())), "{toml}");
        let lib = std::fs::read_to_string(created.dir.join("src/lib.rs")).unwrap();
        assert!(lib.contains("route: \"/sdxl-turbo\"") && lib.contains("analytics_prefix: \"sdxl_turbo\""));
        assert!(!lib.contains("{{"), "every placeholder filled");
        assert_eq!(created.artifact, "sdxl_turbo.wasm");
        let again = create(&args, out.path()).unwrap_err();
        assert!(format!("{again:#}").contains("already exists"));
    }
}
