//! Model readiness: for each plugin, whether every model requirement it declared is met
//! by a file on the volume. Used by `flowhost models status` and `/health`.
//!
//! Owns the report types and their text rendering. Must never download, create or
//! delete files; it only asks the [`ModelVolume`].

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::volume::ModelVolume;

/// One thing a plugin needs from the volume: met when any alternative is present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirement {
    /// Short human label ("Flux VAE").
    pub purpose: String,
    /// `(folder, name)` alternatives, preferred first.
    pub any_of: Vec<(String, String)>,
}

/// Everything one plugin declared it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginNeeds {
    pub plugin: String,
    pub route: String,
    pub requirements: Vec<Requirement>,
}

/// Readiness of every plugin's models.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelsReport {
    /// Every requirement of every plugin is met.
    pub ready: bool,
    pub plugins: Vec<PluginModelsStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PluginModelsStatus {
    pub plugin: String,
    pub route: String,
    pub ready: bool,
    pub requirements: Vec<RequirementStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequirementStatus {
    pub purpose: String,
    #[serde(flatten)]
    pub state: RequirementState,
}

/// `{"status": "present", "folder", "name", "size"}` or
/// `{"status": "missing", "looked_for": ["folder/name", ...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum RequirementState {
    /// The first alternative found on the volume.
    Present {
        folder: String,
        name: String,
        size: u64,
    },
    /// None of the alternatives is present (`folder/name` each).
    Missing { looked_for: Vec<String> },
}

/// Of `looked_for` (`folder/name` each), the files that exist on the volume but have 0 bytes (an
/// interrupted download or a placeholder): "missing" alone would send the operator looking for a
/// file that is right there.
pub fn empty_files(volume: &ModelVolume, looked_for: &[String]) -> Vec<String> {
    looked_for
        .iter()
        .filter(|rel| {
            let path = volume.root().join(rel.as_str());
            rel.split('/').all(|seg| !seg.is_empty() && seg != "..") && std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == 0)
        })
        .cloned()
        .collect()
}

/// Check every plugin's requirements against the volume.
///
/// A requirement with no alternatives can never be met and is reported missing.
pub fn check(volume: &ModelVolume, needs: &[PluginNeeds]) -> ModelsReport {
    let plugins: Vec<PluginModelsStatus> = needs
        .iter()
        .map(|plugin| {
            let requirements: Vec<RequirementStatus> = plugin
                .requirements
                .iter()
                .map(|requirement| RequirementStatus {
                    purpose: requirement.purpose.clone(),
                    state: check_requirement(volume, requirement),
                })
                .collect();
            PluginModelsStatus {
                plugin: plugin.plugin.clone(),
                route: plugin.route.clone(),
                ready: requirements.iter().all(RequirementStatus::is_present),
                requirements,
            }
        })
        .collect();
    ModelsReport {
        ready: plugins.iter().all(|plugin| plugin.ready),
        plugins,
    }
}

fn check_requirement(volume: &ModelVolume, requirement: &Requirement) -> RequirementState {
    for (folder, name) in &requirement.any_of {
        if let Some(file) = volume.find(folder, name) {
            return RequirementState::Present {
                folder: folder.clone(),
                name: file.name,
                size: file.size,
            };
        }
    }
    RequirementState::Missing {
        looked_for: requirement
            .any_of
            .iter()
            .map(|(folder, name)| format!("{folder}/{name}"))
            .collect(),
    }
}

impl RequirementStatus {
    pub fn is_present(&self) -> bool {
        matches!(self.state, RequirementState::Present { .. })
    }
}

/// The report for a terminal (`flowhost models status`).
///
/// ```text
/// flux-dev  /flux-dev  READY
///   ok       Flux diffusion model  diffusion_models/flux1-dev.safetensors (23.8 GB)
/// flux-lora  /flux-lora  NOT READY
///   MISSING  Flux VAE              looked for vae/ae.safetensors
///
/// 1 of 2 plugins ready; 1 model requirement missing.
/// ```
pub fn render_text(report: &ModelsReport) -> String {
    let mut text = String::new();
    for plugin in &report.plugins {
        let verdict = if plugin.ready { "READY" } else { "NOT READY" };
        let _ = writeln!(text, "{}  {}  {verdict}", plugin.plugin, plugin.route);
        let width = plugin
            .requirements
            .iter()
            .map(|r| r.purpose.chars().count())
            .max()
            .unwrap_or(0);
        if plugin.requirements.is_empty() {
            let _ = writeln!(text, "  (declares no model files)");
        }
        for requirement in &plugin.requirements {
            let purpose = &requirement.purpose;
            match &requirement.state {
                RequirementState::Present { folder, name, size } => {
                    let _ = writeln!(
                        text,
                        "  ok       {purpose:<width$}  {folder}/{name} ({})",
                        human_size(*size)
                    );
                }
                RequirementState::Missing { looked_for } if looked_for.is_empty() => {
                    let _ = writeln!(
                        text,
                        "  MISSING  {purpose:<width$}  (the plugin names no file)"
                    );
                }
                RequirementState::Missing { looked_for } => {
                    let _ = writeln!(
                        text,
                        "  MISSING  {purpose:<width$}  looked for {}",
                        looked_for.join(", ")
                    );
                }
            }
        }
    }
    let ready = report.plugins.iter().filter(|p| p.ready).count();
    let missing = report
        .plugins
        .iter()
        .flat_map(|p| &p.requirements)
        .filter(|r| !r.is_present())
        .count();
    let _ = writeln!(
        text,
        "\n{ready} of {} plugin{} ready; {missing} model requirement{} missing.",
        report.plugins.len(),
        plural(report.plugins.len()),
        plural(missing),
    );
    if missing > 0 {
        text.push_str("Download them with `flowhost models pull --models DIR`.\n");
    }
    text
}

fn plural(count: usize) -> &'static str {
    if count == 1 { "" } else { "s" }
}

/// `23.8 GB`, `512.0 KB`, `17 B` (decimal units, like download pages).
fn human_size(bytes: u64) -> String {
    const UNITS: &[&str] = &["KB", "MB", "GB", "TB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1000.0;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_model_file_is_named_as_existing_with_zero_bytes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("loras")).unwrap();
        std::fs::write(dir.path().join("loras/empty.safetensors"), b"").unwrap();
        std::fs::write(dir.path().join("loras/full.safetensors"), b"x").unwrap();
        let volume = ModelVolume::new(dir.path());
        let looked_for = vec!["loras/empty.safetensors".to_string(), "loras/absent.safetensors".into(), "loras/full.safetensors".into(), "../loras/empty.safetensors".into()];
        assert_eq!(empty_files(&volume, &looked_for), vec!["loras/empty.safetensors".to_string()]);
    }
    use std::path::Path;

    fn write(root: &Path, relative: &str, bytes: &[u8]) {
        let path = root.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    fn requirement(purpose: &str, any_of: &[(&str, &str)]) -> Requirement {
        Requirement {
            purpose: purpose.into(),
            any_of: any_of
                .iter()
                .map(|(f, n)| (f.to_string(), n.to_string()))
                .collect(),
        }
    }

    fn flux_needs() -> Vec<PluginNeeds> {
        vec![
            PluginNeeds {
                plugin: "flux-dev".into(),
                route: "/flux-dev".into(),
                requirements: vec![
                    requirement(
                        "Flux diffusion model",
                        &[
                            ("diffusion_models", "flux1-dev.safetensors"),
                            ("diffusion_models", "flux1-dev-fp8.safetensors"),
                        ],
                    ),
                    requirement("Flux VAE", &[("vae", "ae.safetensors")]),
                ],
            },
            PluginNeeds {
                plugin: "workflow".into(),
                route: "/workflow".into(),
                requirements: vec![],
            },
        ]
    }

    #[test]
    fn a_present_alternative_is_reported_with_its_file_and_a_missing_one_with_what_was_looked_for()
    {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "unet/flux1-dev-fp8.safetensors", &[0; 1500]);
        let volume = ModelVolume::new(dir.path());
        let report = check(&volume, &flux_needs());
        assert!(!report.ready);
        let flux = &report.plugins[0];
        assert!(!flux.ready);
        assert_eq!(
            flux.requirements[0].state,
            RequirementState::Present {
                folder: "diffusion_models".into(),
                name: "flux1-dev-fp8.safetensors".into(),
                size: 1500
            }
        );
        assert_eq!(
            flux.requirements[1].state,
            RequirementState::Missing {
                looked_for: vec!["vae/ae.safetensors".into()]
            }
        );
        assert!(
            report.plugins[1].ready,
            "a plugin without model needs is ready"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["plugins"][0]["requirements"][1]["status"], "missing");
        assert_eq!(json["plugins"][0]["requirements"][0]["size"], 1500);
    }

    #[test]
    fn everything_present_is_ready() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "diffusion_models/flux1-dev.safetensors", b"w");
        write(dir.path(), "vae/ae.safetensors", b"w");
        let report = check(&ModelVolume::new(dir.path()), &flux_needs());
        assert!(report.ready);
        assert!(
            render_text(&report).contains("2 of 2 plugins ready; 0 model requirements missing.")
        );
    }

    #[test]
    fn the_text_names_each_missing_file_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "diffusion_models/flux1-dev.safetensors",
            &vec![1; 23_800_000],
        );
        let text = render_text(&check(&ModelVolume::new(dir.path()), &flux_needs()));
        assert!(text.contains("flux-dev  /flux-dev  NOT READY"), "{text}");
        assert!(
            text.contains("diffusion_models/flux1-dev.safetensors (23.8 MB)"),
            "{text}"
        );
        assert!(
            text.contains("MISSING  Flux VAE              looked for vae/ae.safetensors"),
            "{text}"
        );
        assert!(
            text.contains("1 of 2 plugins ready; 1 model requirement missing."),
            "{text}"
        );
        assert!(text.contains("flowhost models pull"), "{text}");
    }

    #[test]
    fn a_requirement_without_alternatives_is_never_met() {
        let dir = tempfile::tempdir().unwrap();
        let needs = vec![PluginNeeds {
            plugin: "odd".into(),
            route: "/odd".into(),
            requirements: vec![requirement("nothing", &[])],
        }];
        let report = check(&ModelVolume::new(dir.path()), &needs);
        assert!(!report.ready);
        assert!(render_text(&report).contains("(the plugin names no file)"));
    }
}
