#!/usr/bin/env python3
"""Random-weight model files for the identity routes (/flux-instantid, /flux-pulid) in the
shapes and key layouts the pinned loaders read, plus stand-ins for InsightFace antelopev2.
make_models.py (beside this file) writes the Flux files; this writes the rest:

  checkpoints/sd_xl_base_1.0.safetensors   SDXL (full) or Segmind-Vega (tiny: an SDXL-family UNet
                                           ComfyUI detects as such, 745 M): UNet, CLIP-L + bigG, VAE,
                                           keys as ComfyUI's own CheckpointSave writes them
  instantid/ip-adapter.bin                 InstantID IP-Adapter: {"image_proj": Resampler(1280, 4,
                                           64, 20, 16, 512, 2048), "ip_adapter": 70 x to_k_ip/to_v_ip}
  controlnet/instantid/diffusion_pytorch_model.safetensors
                                           InstantID ControlNet in diffusers key names (SDXL, or
                                           Segmind-Vega for tiny), built from ComfyUI's ControlNet
  pulid/pulid_flux_v0.9.1.safetensors      PuLID-Flux: IDFormer + 20 PerceiverAttentionCA (the node's classes)
  text_encoders/EVA02_CLIP_L_336_psz14_s6B.pt
                                           EVA02-CLIP-L-14-336 visual tower (the node's eva_clip package)
  facexlib/detection_Resnet50_Final.pth    facexlib RetinaFace(resnet50)
  facexlib/parsing_bisenet.pth             facexlib BiSeNet(19)
  insightface/models/antelopev2/*.onnx     stand-ins, see below

antelopev2 stand-ins: five ONNX files with the inputs and outputs insightface's model zoo routes
by (scrfd_10g_bnkps: 9 outputs = score/bbox/kps at strides 8/16/32, 2 anchors; glintr100: 112x112
-> 512; 1k3d68: 192x192 -> 3309; 2d106det: 192x192 -> 212; genderage: 96x96 -> 3). The detector
"sees a face" where a 32x32 cell is warm (mean R - B above 0.3 after insightface's normalisation):
`--images DIR` writes reference-face.png (a skin-toned face on grey, found at every detection size)
and reference-noface.png (a cool grey-blue scene, never found). Embeddings and landmarks are fixed
functions of the pixels, so runs are deterministic.

Nothing is downloaded: the classes come from the ComfyUI tree and the pinned node packs.

Usage:
  python3 make_identity_models.py --comfyui DIR --out MODELS_DIR [--profile full|tiny] [--images DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import time

DTYPES = {}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", required=True, help="ComfyUI source tree with the pinned custom nodes")
    ap.add_argument("--out", required=True, help="models folder to fill")
    ap.add_argument("--profile", choices=["full", "tiny"], default="full")
    ap.add_argument("--only", default="", help="comma list of sdxl,instantid,controlnet,pulid,eva,facexlib,antelopev2")
    ap.add_argument("--images", default="", help="also write reference-face.png and reference-noface.png here")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    comfy_dir = os.path.abspath(args.comfyui)
    sys.path.insert(0, comfy_dir)
    import torch

    if not torch.cuda.is_available():
        from comfy.cli_args import args as comfy_args

        comfy_args.cpu = True
    global DTYPES
    DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}
    torch.manual_seed(args.seed)
    # On a GPU the random values are drawn there (a full SDXL is 3.5 G values: minutes on CPU cores).
    gen = torch.Generator(device="cuda" if torch.cuda.is_available() else "cpu").manual_seed(args.seed)
    only = set(filter(None, args.only.split(","))) or {"sdxl", "instantid", "controlnet", "pulid", "eva", "facexlib", "antelopev2"}
    tiny = args.profile == "tiny"
    report = {"profile": args.profile, "files": {}}
    out = args.out

    def record(key, path, t0):
        report["files"][key] = {"path": os.path.relpath(path, out), "bytes": os.path.getsize(path), "seconds": round(time.monotonic() - t0, 1)}

    unet_config = sdxl_unet_config(torch, tiny)
    if "sdxl" in only:
        t0 = time.monotonic()
        path = os.path.join(out, "checkpoints", "sd_xl_base_1.0.safetensors")
        write_safetensors(torch, path, sdxl_checkpoint_shapes(torch, unet_config, tiny), torch.float16, gen,
                          {"format": "pt", "note": "random weights, " + ("Segmind-Vega" if tiny else "SDXL") + " shapes"})
        record("sdxl", path, t0)
    if "controlnet" in only:
        t0 = time.monotonic()
        path = os.path.join(out, "controlnet", "instantid", "diffusion_pytorch_model.safetensors")
        write_safetensors(torch, path, controlnet_diffusers_shapes(torch, unet_config), torch.float16, gen, {"format": "pt"})
        record("controlnet", path, t0)
    if "instantid" in only:
        t0 = time.monotonic()
        path = os.path.join(out, "instantid", "ip-adapter.bin")
        write_instantid(torch, path, comfy_dir, gen)
        record("instantid", path, t0)
    if "pulid" in only:
        t0 = time.monotonic()
        path = os.path.join(out, "pulid", "pulid_flux_v0.9.1.safetensors")
        write_safetensors(torch, path, pulid_shapes(torch, comfy_dir), torch.bfloat16, gen, {"format": "pt"})
        record("pulid", path, t0)
    if "eva" in only:
        t0 = time.monotonic()
        path = os.path.join(out, "text_encoders", "EVA02_CLIP_L_336_psz14_s6B.pt")
        write_eva(torch, path, comfy_dir)
        record("eva", path, t0)
    if "facexlib" in only:
        t0 = time.monotonic()
        for key, path in write_facexlib(torch, os.path.join(out, "facexlib")):
            record(key, path, t0)
    if "antelopev2" in only:
        t0 = time.monotonic()
        for key, path in write_antelopev2(os.path.join(out, "insightface", "models", "antelopev2"), args.seed):
            record(key, path, t0)
    if args.images:
        write_reference_images(args.images)
        report["images"] = [os.path.join(args.images, n) for n in ("reference-face.png", "reference-noface.png")]
    print(json.dumps(report, indent=1), flush=True)
    return 0


# --- SDXL -------------------------------------------------------------------------------

def sdxl_unet_config(torch, tiny: bool) -> dict:
    """ComfyUI's own SDXL / Segmind-Vega UNet configs (comfy/model_detection.py)."""
    cfg = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
           "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
           "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "use_linear_in_transformer": True, "context_dim": 2048,
           "num_head_channels": 64, "use_temporal_attention": False, "use_temporal_resblock": False}
    if tiny:
        cfg.update(transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2], transformer_depth_middle=-1)
    else:
        cfg.update(transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10)
    return cfg


def shapes_of(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def sdxl_checkpoint_shapes(torch, unet_config: dict, tiny: bool) -> dict:
    """Keys as ComfyUI's CheckpointSave writes an SDXL checkpoint (model_config's *_for_saving)."""
    import comfy.ops
    import comfy.supported_models as sm
    import comfy.sdxl_clip
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ops = comfy.ops.disable_weight_init
    model_config = (sm.Segmind_Vega if tiny else sm.SDXL)(dict(unet_config))
    with torch.device("meta"):
        unet = UNetModel(**unet_config, dtype=torch.float16, device="meta", operations=ops)
        clip = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16)
        ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
        vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    sd = {}
    sd.update({"model.diffusion_model." + k: v for k, v in unet.state_dict().items()})
    sd.update(model_config.process_clip_state_dict_for_saving(clip.state_dict()))
    sd.update(model_config.process_vae_state_dict_for_saving(vae.state_dict()))
    shapes = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            shapes[k] = ("arange", tuple(v.shape))
        else:
            shapes[k] = tuple(v.shape)
    return shapes


def controlnet_diffusers_shapes(torch, unet_config: dict) -> dict:
    """ComfyUI's ControlNet for this UNet, renamed to the diffusers keys its loader maps back."""
    import comfy.ops
    import comfy.utils
    from comfy.cldm.cldm import ControlNet

    cfg = dict(unet_config)
    cfg.pop("out_channels", None)
    cfg["hint_channels"] = 3
    with torch.device("meta"):
        cn = ControlNet(**cfg, dtype=torch.float16, device="meta", operations=comfy.ops.disable_weight_init)
    comfy_shapes = shapes_of(cn)
    to_comfy = comfy.utils.unet_to_diffusers(unet_config)  # diffusers key -> comfy key (UNet part)
    to_comfy["controlnet_mid_block.weight"] = "middle_block_out.0.weight"
    to_comfy["controlnet_mid_block.bias"] = "middle_block_out.0.bias"
    n_zero = len([k for k in comfy_shapes if k.startswith("zero_convs.") and k.endswith(".weight")])
    for i in range(n_zero):
        for s in (".weight", ".bias"):
            to_comfy[f"controlnet_down_blocks.{i}{s}"] = f"zero_convs.{i}.0{s}"
    hint = sorted({int(k.split(".")[1]) for k in comfy_shapes if k.startswith("input_hint_block.")})
    for n, idx in enumerate(hint):
        name = "conv_in" if n == 0 else ("conv_out" if n == len(hint) - 1 else f"blocks.{n - 1}")
        for s in (".weight", ".bias"):
            to_comfy[f"controlnet_cond_embedding.{name}{s}"] = f"input_hint_block.{idx}{s}"
    from_comfy = {c: d for d, c in to_comfy.items()}
    shapes, missing = {}, []
    for k, shape in comfy_shapes.items():
        if k in from_comfy:
            shapes[from_comfy[k]] = shape
        else:
            missing.append(k)
    if missing:
        raise SystemExit(f"controlnet: no diffusers name for {missing[:5]} (+{max(0, len(missing) - 5)})")
    return shapes


# --- InstantID ---------------------------------------------------------------------------

def write_instantid(torch, path: str, comfy_dir: str, gen) -> None:
    sys.path.insert(0, os.path.join(comfy_dir, "custom_nodes", "ComfyUI_InstantID"))
    from resampler import Resampler  # the pack's own class (InstantID.py: init_proj)

    proj = Resampler(dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, embedding_dim=512, output_dim=2048, ff_mult=4)
    image_proj = {k: init_tensor(torch, k, tuple(v.shape), torch.float16, gen) for k, v in proj.state_dict().items()}
    # 70 cross-attention layers in the order InstantID.py patches them (module_key = 2n+1):
    # input 4,5 (640 x2 each), input 7,8 (1280 x10), output 0-2 (1280 x10), output 3-5 (640 x2), middle (1280 x10).
    dims = [640] * 4 + [1280] * 20 + [1280] * 30 + [640] * 6 + [1280] * 10
    ip_adapter = {}
    for n, dim in enumerate(dims):
        for kv in ("to_k_ip", "to_v_ip"):
            name = f"{2 * n + 1}.{kv}.weight"
            ip_adapter[name] = init_tensor(torch, name, (dim, 2048), torch.float16, gen)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, path + ".part")
    os.replace(path + ".part", path)


# --- PuLID-Flux, EVA-CLIP ------------------------------------------------------------------

def pulid_node_package(comfy_dir: str):
    sys.path.insert(0, os.path.join(comfy_dir, "custom_nodes", "ComfyUI_PuLID_Flux_ll"))


def pulid_shapes(torch, comfy_dir: str) -> dict:
    pulid_node_package(comfy_dir)
    from encoders_flux import IDFormer, PerceiverAttentionCA  # the pack's own classes

    # PulidFluxModel: 19 double blocks every 2nd + 38 single blocks every 4th = 10 + 10 cross-attentions.
    num_ca = 19 // 2 + 38 // 4 + (1 if 19 % 2 else 0) + (1 if 38 % 4 else 0)
    with torch.device("meta"):
        enc = IDFormer()
        cas = [PerceiverAttentionCA() for _ in range(num_ca)]
    shapes = {"pulid_encoder." + k: s for k, s in shapes_of(enc).items()}
    for i, ca in enumerate(cas):
        shapes.update({f"pulid_ca.{i}.{k}": s for k, s in shapes_of(ca).items()})
    return shapes


def write_eva(torch, path: str, comfy_dir: str) -> None:
    pulid_node_package(comfy_dir)
    from eva_clip.factory import create_model  # the pack's EVA-CLIP, built from its own config

    model = create_model("EVA02-CLIP-L-14-336", force_custom_clip=True)
    visual = {"visual." + k: v.detach().to(torch.float16).contiguous() for k, v in model.visual.state_dict().items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(visual, path + ".part")
    os.replace(path + ".part", path)


# --- facexlib ------------------------------------------------------------------------------

def write_facexlib(torch, folder: str):
    from facexlib.detection.retinaface import RetinaFace
    from facexlib.parsing.bisenet import BiSeNet

    os.makedirs(folder, exist_ok=True)
    written = []
    for key, name, model in (
        ("facexlib_detection", "detection_Resnet50_Final.pth", RetinaFace(network_name="resnet50", half=False, device=torch.device("cpu"))),
        ("facexlib_parsing", "parsing_bisenet.pth", BiSeNet(num_class=19)),
    ):
        path = os.path.join(folder, name)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, path + ".part")
        os.replace(path + ".part", path)
        written.append((key, path))
    return written


# --- antelopev2 stand-ins --------------------------------------------------------------------

def write_antelopev2(folder: str, seed: int):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    written = []

    def save(name, nodes, inputs, outputs, inits):
        graph = helper.make_graph(nodes, name, inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="flowhost-standin")
        model.ir_version = 8
        onnx.checker.check_model(model)
        path = os.path.join(folder, name + ".onnx")
        onnx.save(model, path + ".part")
        os.replace(path + ".part", path)
        written.append((name, path))

    f32 = lambda a: np.asarray(a, dtype=np.float32)
    i64 = lambda a: np.asarray(a, dtype=np.int64)

    # Detector (SCRFD with keypoints). Input 'input.1' [1,3,H,W], RGB normalised (x-127.5)/128.
    nodes, inits, outs = [], {}, []
    inits.update({"c0": i64([0]), "c1": i64([1]), "c2": i64([2]), "c3": i64([3]), "ax1": i64([1]),
                  "gain": f32(30.0), "thr": f32(0.3), "off": f32(-20.0), "zero": f32(0.0), "shape_n1": i64([-1, 1]),
                  "box": f32([[7.0, 7.0, 7.0, 7.0]]),
                  # five points (eyes, nose, mouth corners) in stride units around the anchor
                  "kps": f32([[-1.2, -1.0, 1.2, -1.0, 0.0, 0.3, -0.9, 1.3, 0.9, 1.3]])})
    score_names, box_names, kps_names = [], [], []
    for s in (8, 16, 32):
        p = f"s{s}"
        nodes += [
            helper.make_node("AveragePool", ["input.1"], [p + "_pool"], kernel_shape=[s, s], strides=[s, s]),
            helper.make_node("Slice", [p + "_pool", "c0", "c1", "ax1"], [p + "_r"]),
            helper.make_node("Slice", [p + "_pool", "c2", "c3", "ax1"], [p + "_b"]),
            helper.make_node("Sub", [p + "_r", p + "_b"], [p + "_d"]),
        ]
        if s == 32:
            nodes += [helper.make_node("Sub", [p + "_d", "thr"], [p + "_e"]),
                      helper.make_node("Mul", [p + "_e", "gain"], [p + "_logit"])]
        else:
            nodes += [helper.make_node("Mul", [p + "_d", "zero"], [p + "_z"]),
                      helper.make_node("Add", [p + "_z", "off"], [p + "_logit"])]
        nodes += [
            helper.make_node("Sigmoid", [p + "_logit"], [p + "_sig"]),
            helper.make_node("Transpose", [p + "_sig"], [p + "_t"], perm=[0, 2, 3, 1]),
            helper.make_node("Concat", [p + "_t", p + "_t"], [p + "_two"], axis=3),
            helper.make_node("Reshape", [p + "_two", "shape_n1"], [f"score_{s}"]),
            helper.make_node("Mul", [f"score_{s}", "zero"], [p + "_zeros"]),
            helper.make_node("Add", [p + "_zeros", "box"], [f"bbox_{s}"]),
            helper.make_node("Add", [p + "_zeros", "kps"], [f"kps_{s}"]),
        ]
        score_names.append(f"score_{s}"); box_names.append(f"bbox_{s}"); kps_names.append(f"kps_{s}")
    # One symbolic length per stride: onnxruntime takes equal dim names for equal sizes.
    for s, n in zip((8, 16, 32), score_names):
        outs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, [f"anchors_{s}", 1]))
    for s, n in zip((8, 16, 32), box_names):
        outs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, [f"anchors_{s}", 4]))
    for s, n in zip((8, 16, 32), kps_names):
        outs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, [f"anchors_{s}", 10]))
    save("scrfd_10g_bnkps", nodes, [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "h", "w"])], outs, inits)

    def pooled_linear(name, size, pool, out_dim, scale, bias_scale):
        cells = (size // pool) ** 2 * 3
        inits = {"w": f32(rng.normal(0, scale / math.sqrt(cells), (cells, out_dim))),
                 "b": f32(rng.uniform(-bias_scale, bias_scale, (1, out_dim)))}
        nodes = [helper.make_node("AveragePool", ["data"], ["pool"], kernel_shape=[pool, pool], strides=[pool, pool]),
                 helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
                 helper.make_node("MatMul", ["flat", "w"], ["mm"]),
                 helper.make_node("Add", ["mm", "b"], ["fc1"])]
        save(name, nodes, [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["None", 3, size, size])],
             [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["None", out_dim])], inits)

    pooled_linear("glintr100", 112, 8, 512, 1.0, 0.1)      # ArcFace recognition: 512-d embedding
    pooled_linear("1k3d68", 192, 16, 3309, 0.05, 0.6)       # 68 x 3 landmarks (+ the 1035 leading values insightface drops)
    pooled_linear("2d106det", 192, 16, 212, 0.05, 0.6)      # 106 x 2 landmarks
    pooled_linear("genderage", 96, 8, 3, 0.05, 0.5)         # gender logits + age/100
    return written


def write_reference_images(folder: str) -> None:
    from PIL import Image, ImageDraw

    os.makedirs(folder, exist_ok=True)
    face = Image.new("RGB", (512, 512), (128, 128, 128))
    d = ImageDraw.Draw(face)
    d.ellipse((146, 96, 366, 400), fill=(228, 178, 148))       # skin
    d.ellipse((196, 200, 236, 224), fill=(60, 40, 30))          # eyes
    d.ellipse((276, 200, 316, 224), fill=(60, 40, 30))
    d.polygon([(256, 230), (240, 290), (272, 290)], fill=(205, 150, 125))
    d.ellipse((216, 320, 296, 346), fill=(170, 70, 70))         # mouth
    face.save(os.path.join(folder, "reference-face.png"))
    scene = Image.new("RGB", (512, 512), (96, 118, 140))
    d = ImageDraw.Draw(scene)
    d.rectangle((0, 330, 512, 512), fill=(70, 96, 110))         # a cool landscape: no warm cell anywhere
    d.ellipse((360, 60, 440, 140), fill=(200, 210, 225))
    scene.save(os.path.join(folder, "reference-noface.png"))


# --- writing ----------------------------------------------------------------------------------

def init_tensor(torch, name: str, shape, dtype, gen):
    """Finite, modest values: norm weights 1, biases 0, weights N(0, (0.5/sqrt(fan_in))^2)."""
    if len(shape) <= 1:
        if name.rsplit(".", 1)[-1] in ("bias", "beta", "running_mean"):
            return torch.zeros(shape, dtype=dtype)
        return torch.ones(shape, dtype=dtype)
    fan_in = math.prod(shape[1:])
    t = torch.empty(shape, dtype=torch.float32, device=gen.device)
    t.normal_(0.0, 0.5 / math.sqrt(fan_in), generator=gen)
    return t.to(dtype).cpu()


def write_safetensors(torch, path: str, shapes: dict, dtype, gen, metadata: dict) -> None:
    """Stream a safetensors file (header, then tensors in header order); never the whole file in memory."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    header = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
    offset, plan = 0, []
    for name in sorted(shapes):
        spec = shapes[name]
        if spec and isinstance(spec[0], str):  # ("arange", shape): position ids
            shape, tdtype = spec[1], torch.int64
        else:
            shape, tdtype = spec, dtype
        n = math.prod(shape) * torch.tensor([], dtype=tdtype).element_size()
        header[name] = {"dtype": DTYPES[tdtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        plan.append((name, spec, shape, tdtype))
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    with open(path + ".part", "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, spec, shape, tdtype in plan:
            if tdtype == torch.int64:
                t = torch.arange(shape[-1], dtype=torch.int64).expand(shape).contiguous()
            else:
                t = init_tensor(torch, name, shape, tdtype, gen)
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
    os.replace(path + ".part", path)


if __name__ == "__main__":
    raise SystemExit(main())
