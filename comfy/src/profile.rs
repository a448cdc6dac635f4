//! ComfyUI launch profiles: named bundles of `main.py` options that trade
//! faithfulness for speed on the GPU at hand, so an operator picks `fp8` instead of
//! remembering four flags. Every flag here exists in ComfyUI 0.3.64
//! (`comfy/cli_args.py` at a125cd84); a test keeps the list in step with the
//! supervisor's command line. This module only names options; it never inspects the
//! GPU or decides for the operator (profiles are opt-in, `default` adds nothing).

use std::fmt;
use std::str::FromStr;

/// A named set of ComfyUI options (`flowhost serve --comfyui-profile NAME`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LaunchProfile {
    /// ComfyUI's own defaults: nothing added.
    #[default]
    Default,
    /// `--highvram`: keep every model on the GPU between jobs instead of offloading
    /// to RAM when done. Same images; pays when several models alternate (LoRA,
    /// text encoders) on a card with room for all of them.
    HighVram,
    /// `--fp8_e4m3fn-unet --fast fp8_matrix_mult`: the diffusion model's weights
    /// stored in fp8 (e4m3fn) and its matrix products run in fp8 on GPUs that have
    /// fp8 tensor cores (compute capability ≥ 8.9: Ada L4/L40S, Hopper H100/H200);
    /// elsewhere ComfyUI casts back to bf16 per layer (half the VRAM, no speed-up).
    /// **Changes the images**: same composition, different fine detail.
    Fp8,
    /// `fp8` plus `--highvram` and `--fast autotune` (cuDNN picks the fastest
    /// convolution kernels for the VAE after a first, slower call).
    Fast,
}

impl LaunchProfile {
    /// Every profile, in the order the docs list them.
    pub const ALL: [LaunchProfile; 4] = [
        LaunchProfile::Default,
        LaunchProfile::HighVram,
        LaunchProfile::Fp8,
        LaunchProfile::Fast,
    ];

    /// The name used on the command line and in `/health`.
    pub fn name(self) -> &'static str {
        match self {
            LaunchProfile::Default => "default",
            LaunchProfile::HighVram => "highvram",
            LaunchProfile::Fp8 => "fp8",
            LaunchProfile::Fast => "fast",
        }
    }

    /// The `main.py` options this profile adds (before the operator's own
    /// `--comfyui-arg`s, so those come last).
    pub fn args(self) -> &'static [&'static str] {
        match self {
            LaunchProfile::Default => &[],
            LaunchProfile::HighVram => &["--highvram"],
            LaunchProfile::Fp8 => &["--fp8_e4m3fn-unet", "--fast", "fp8_matrix_mult"],
            LaunchProfile::Fast => &[
                "--fp8_e4m3fn-unet",
                "--highvram",
                "--fast",
                "fp8_matrix_mult",
                "autotune",
            ],
        }
    }

    /// Whether the profile changes the pixels a seed gives (fp8 weights do).
    pub fn changes_outputs(self) -> bool {
        matches!(self, LaunchProfile::Fp8 | LaunchProfile::Fast)
    }
}

impl fmt::Display for LaunchProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown profile name; its message lists the known ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownProfile(pub String);

impl fmt::Display for UnknownProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let known: Vec<&str> = LaunchProfile::ALL.iter().map(|p| p.name()).collect();
        write!(
            f,
            "unknown ComfyUI launch profile {:?} (known: {})",
            self.0,
            known.join(", ")
        )
    }
}

impl std::error::Error for UnknownProfile {}

impl FromStr for LaunchProfile {
    type Err = UnknownProfile;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LaunchProfile::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownProfile(s.chars().take(64).collect()))
    }
}

/// ComfyUI's `--preview-method` values (latent previews sent while sampling).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreviewMethod {
    None,
    Auto,
    Latent2Rgb,
    Taesd,
}

impl PreviewMethod {
    pub const ALL: [PreviewMethod; 4] = [
        PreviewMethod::None,
        PreviewMethod::Auto,
        PreviewMethod::Latent2Rgb,
        PreviewMethod::Taesd,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PreviewMethod::None => "none",
            PreviewMethod::Auto => "auto",
            PreviewMethod::Latent2Rgb => "latent2rgb",
            PreviewMethod::Taesd => "taesd",
        }
    }
}

impl FromStr for PreviewMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PreviewMethod::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = PreviewMethod::ALL.iter().map(|p| p.name()).collect();
                format!(
                    "unknown preview method {:?} (known: {})",
                    s.chars().take(64).collect::<String>(),
                    known.join(", ")
                )
            })
    }
}

/// The options a profile and a preview method add to `main.py`'s command line.
pub fn launch_args(profile: LaunchProfile, preview: Option<PreviewMethod>) -> Vec<String> {
    let mut args: Vec<String> = profile.args().iter().map(|a| a.to_string()).collect();
    if let Some(preview) = preview {
        args.extend(["--preview-method".to_string(), preview.name().to_string()]);
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_list_the_known_ones() {
        for p in LaunchProfile::ALL {
            assert_eq!(p.name().parse::<LaunchProfile>(), Ok(p));
        }
        let err = "turbo".parse::<LaunchProfile>().unwrap_err().to_string();
        assert!(
            err.contains("\"turbo\"") && err.contains("default, highvram, fp8, fast"),
            "{err}"
        );
        assert!("sage".parse::<PreviewMethod>().is_err());
    }

    #[test]
    fn default_adds_nothing_and_only_fp8_profiles_change_outputs() {
        assert!(LaunchProfile::Default.args().is_empty());
        assert!(launch_args(LaunchProfile::Default, None).is_empty());
        assert!(!LaunchProfile::HighVram.changes_outputs());
        assert!(LaunchProfile::Fp8.changes_outputs() && LaunchProfile::Fast.changes_outputs());
        assert_eq!(
            launch_args(LaunchProfile::HighVram, Some(PreviewMethod::Latent2Rgb)),
            ["--highvram", "--preview-method", "latent2rgb"]
        );
    }

    /// Every option a profile passes is one ComfyUI 0.3.64's `cli_args.py` defines
    /// (the list below is copied from that file at a125cd84), so a profile can never
    /// make ComfyUI exit with "unrecognized arguments".
    #[test]
    fn every_profile_option_exists_in_comfyui_0_3_64() {
        const CLI_ARGS_0_3_64: &[&str] = &[
            "--highvram",
            "--gpu-only",
            "--fp8_e4m3fn-unet",
            "--fast",
            "--preview-method",
            "--use-pytorch-cross-attention",
        ];
        const FAST_FEATURES_0_3_64: &[&str] = &[
            "fp16_accumulation",
            "fp8_matrix_mult",
            "cublas_ops",
            "autotune",
        ];
        for p in LaunchProfile::ALL {
            let mut after_fast = false;
            for a in p.args() {
                if a.starts_with("--") {
                    assert!(CLI_ARGS_0_3_64.contains(a), "{p}: {a}");
                    after_fast = *a == "--fast";
                } else {
                    assert!(
                        after_fast && FAST_FEATURES_0_3_64.contains(a),
                        "{p}: {a} is not a --fast feature"
                    );
                }
            }
        }
    }
}
