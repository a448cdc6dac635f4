//! ComfyUI launch profiles: named bundles of `main.py` options that trade
//! faithfulness for speed on the GPU at hand, so an operator picks `fp8` instead of
//! remembering four flags. Every flag here exists in ComfyUI 0.3.64
//! (`comfy/cli_args.py` at a125cd84); a test keeps the list in step with the
//! supervisor's command line. This module only names options; it never inspects the
//! GPU or decides for the operator (profiles are opt-in, `default` adds nothing).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::speed::SpeedGraph;

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
    /// The measured speed profile (issue 26, BENCHMARKS.md "Speed profile"): ComfyUI's own
    /// bf16 launch, plus a graph transform the host applies to every job ([`SpeedGraph`]: an
    /// `EasyCache` step cache at [`DEFAULT_STEP_CACHE`] before each sampler's model). 1.83×
    /// images per hour at 1024²/20 through flowhost on an H100 (random weights; 1.91× from a
    /// direct client), 41.2 dB PSNR against `default` for the same seed.
    /// **Changes the images** (skipped steps reuse the previous step's output).
    Speed,
    /// fp8 matrix products, `--highvram` and `TorchCompileModel` (inductor) before each
    /// sampler, with the Inductor/Triton caches kept under the state dir: 1.33× at 1024²/20,
    /// a 77–125 s compile on the first job of a shape. No step cache unless the operator asks
    /// (`--speed-step-cache T`): then `LazyCache`, which decides outside the compiled model
    /// (EasyCache inside it recompiled on its skip branches, 20–80 s per step); with 0.3,
    /// 1.93× interleaved with `default` (1.3 s against 3.6 s per warm image) at 30.3 dB.
    /// **Changes the images** (fp8 weights, skipped steps).
    SpeedCompiled,
}

/// `EasyCache`'s `reuse_threshold` under the speed profile (`--speed-step-cache` changes it).
/// 0.25, not ComfyUI's own 0.2: on the H100 (random weights, 1024²/20) 0.2 gave 1.73–1.77×
/// images per hour, short of the 1.8× the profile is for; 0.25 gave 1.91× (1.83× through
/// flowhost) at 41.2 dB PSNR against `default` (BENCHMARKS.md, "Speed profile, third pass").
pub const DEFAULT_STEP_CACHE: f64 = 0.25;

impl LaunchProfile {
    /// Every profile, in the order the docs list them.
    pub const ALL: [LaunchProfile; 6] = [
        LaunchProfile::Default,
        LaunchProfile::HighVram,
        LaunchProfile::Fp8,
        LaunchProfile::Fast,
        LaunchProfile::Speed,
        LaunchProfile::SpeedCompiled,
    ];

    /// The name used on the command line and in `/health`.
    pub fn name(self) -> &'static str {
        match self {
            LaunchProfile::Default => "default",
            LaunchProfile::HighVram => "highvram",
            LaunchProfile::Fp8 => "fp8",
            LaunchProfile::Fast => "fast",
            LaunchProfile::Speed => "speed",
            LaunchProfile::SpeedCompiled => "speed-compiled",
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
            LaunchProfile::Speed => &[],
            LaunchProfile::SpeedCompiled => &["--fp8_e4m3fn-unet", "--fast", "fp8_matrix_mult", "--highvram"],
        }
    }

    /// The graph transform the host applies to every job under this profile (`None`: the
    /// graph goes to ComfyUI as the plugin built it). `step_cache` is the operator's
    /// `--speed-step-cache` (0: no step cache); unset, `speed` uses [`DEFAULT_STEP_CACHE`] and
    /// `speed-compiled` none.
    pub fn graph_transform(self, step_cache: Option<f64>) -> Option<SpeedGraph> {
        match self {
            LaunchProfile::Speed => Some(SpeedGraph {
                compile: false,
                step_cache: Some(step_cache.unwrap_or(DEFAULT_STEP_CACHE)).filter(|t| *t > 0.0),
            }),
            LaunchProfile::SpeedCompiled => Some(SpeedGraph { compile: true, step_cache: step_cache.filter(|t| *t > 0.0) }),
            _ => None,
        }
    }

    /// Whether ComfyUI compiles under this profile, so its compile caches belong on disk.
    pub fn compiles(self) -> bool {
        matches!(self, LaunchProfile::SpeedCompiled)
    }

    /// Whether the profile changes the pixels a seed gives (fp8 weights do).
    pub fn changes_outputs(self) -> bool {
        matches!(self, LaunchProfile::Fp8 | LaunchProfile::Fast | LaunchProfile::Speed | LaunchProfile::SpeedCompiled)
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

/// Inductor's and Triton's cache folders for a ComfyUI that compiles, under `dir` (the state
/// dir's `compile-cache`, on the volume that outlives the container), so a restarted service
/// reuses compiled kernels instead of compiling again. A variable already set in flowhost's own
/// environment (`is_set`) is the operator's choice and is left alone; a profile that does not
/// compile gets nothing (ComfyUI's behaviour stays its own).
pub fn compile_cache_env(profile: LaunchProfile, dir: &Path, is_set: impl Fn(&str) -> bool) -> Vec<(String, String)> {
    if !profile.compiles() {
        return Vec::new();
    }
    [("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")]
        .into_iter()
        .filter(|(var, _)| !is_set(var))
        .map(|(var, sub)| (var.to_string(), dir.join(sub).display().to_string()))
        .collect()
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
            err.contains("\"turbo\"") && err.contains("default, highvram, fp8, fast, speed"),
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
        assert!(LaunchProfile::Speed.changes_outputs());
        assert_eq!(
            launch_args(LaunchProfile::HighVram, Some(PreviewMethod::Latent2Rgb)),
            ["--highvram", "--preview-method", "latent2rgb"]
        );
    }

    #[test]
    fn only_the_speed_profiles_transform_graphs_and_only_the_compiled_one_keeps_a_compile_cache() {
        let speed = [LaunchProfile::Speed, LaunchProfile::SpeedCompiled];
        for p in LaunchProfile::ALL {
            assert_eq!(p.graph_transform(Some(0.2)).is_some(), speed.contains(&p), "{p}");
            let env = compile_cache_env(p, Path::new("/state/compile-cache"), |_| false);
            assert_eq!(env.is_empty(), p != LaunchProfile::SpeedCompiled, "{p}");
        }
        // `speed`: ComfyUI's own launch and a step cache, never a compile.
        assert!(LaunchProfile::Speed.args().is_empty());
        let t = LaunchProfile::Speed.graph_transform(Some(0.25)).unwrap();
        assert!(!t.compile);
        assert_eq!(t.step_cache, Some(0.25));
        assert_eq!(LaunchProfile::Speed.graph_transform(Some(0.0)).unwrap().step_cache, None, "0 turns the step cache off");
        assert_eq!(LaunchProfile::Speed.graph_transform(None).unwrap().step_cache, Some(DEFAULT_STEP_CACHE));
        // `speed-compiled`: compiled; a step cache only when the operator asks for one (and
        // then LazyCache, outside the compiled model: speed.rs).
        let t = LaunchProfile::SpeedCompiled.graph_transform(None).unwrap();
        assert!(t.compile);
        assert_eq!(t.step_cache, None);
        let t = LaunchProfile::SpeedCompiled.graph_transform(Some(0.3)).unwrap();
        assert_eq!((t.compile, t.step_cache), (true, Some(0.3)));
        assert_eq!(LaunchProfile::SpeedCompiled.graph_transform(Some(0.0)).unwrap().step_cache, None);
        assert_eq!(
            compile_cache_env(LaunchProfile::SpeedCompiled, Path::new("/state/compile-cache"), |_| false),
            [
                ("TORCHINDUCTOR_CACHE_DIR".to_string(), "/state/compile-cache/inductor".to_string()),
                ("TRITON_CACHE_DIR".to_string(), "/state/compile-cache/triton".to_string()),
            ]
        );
        // The operator's own setting wins.
        let env = compile_cache_env(LaunchProfile::SpeedCompiled, Path::new("/s"), |v| v == "TRITON_CACHE_DIR");
        assert_eq!(env.len(), 1);
        assert_eq!(env[0].0, "TORCHINDUCTOR_CACHE_DIR");
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
