"""flowhost's output node for ComfyUI: `FlowhostImageOutput`.

Why it exists: with ComfyUI's `SaveImage`, every finished image is PNG-compressed
(zlib level 4, ~200 ms for a 1024² image on the prompt's own critical path),
written to disk, fetched back over `/view`, decoded by flowhost and re-encoded as
the JPEG the caller asked for. This node skips all of that: it turns the image
tensor into 8-bit pixels exactly as `SaveImage` does (x 255, clipped, truncated)
and pushes them to flowhost over the websocket it already holds. flowhost
encodes the JPEG itself, on several threads.

flowhost installs this file itself when it supervises ComfyUI (`--comfyui-dir`):
it writes it under its state directory and names that folder as a
`custom_nodes` path in the `--extra-model-paths-config` it passes. Against a
ComfyUI it does not start, copy this folder into ComfyUI's `custom_nodes/`.
flowhost only uses the node when `/object_info` lists it, and falls back to
`SaveImage` whenever an image it expected did not arrive (a dropped websocket).

Wire format of one image (one binary websocket frame, sent to the prompt's
client, in order with the prompt's other messages, so before `execution_success`):

    u32 BE  event type 0x464C5752 ("FLWR")
    u32 BE  length of the JSON header that follows
    JSON    {"version": 1, "prompt_id", "node_id", "index", "count", "width",
             "height", "channels", "dtype": "uint8", "layout": "hwc", "filename"}
    bytes   height x width x channels samples, row-major, no padding

The node's history output (`ui.flowhost_rasters`: index, width, height, channels and
`name`, never `filename`, so no client takes it for a file to `/view`) lists what it sent, so
flowhost can tell "sent but lost" from "never produced". A prompt without a `client_id`
gets no frames (ComfyUI would broadcast them to every socket). With list inputs the node
runs once per list item, so `index`/`count` restart per call: flowhost orders frames by
arrival, never by `index`.
"""

import json
import struct

import torch

import server

try:  # ComfyUI >= 0.3.4x sets this around every node it executes.
    from comfy_execution.utils import get_executing_context
except ImportError:  # pragma: no cover - older ComfyUI
    get_executing_context = None

#: The binary event type, big-endian "FLWR"; ComfyUI's own types are small integers.
EVENT_RASTER = 0x464C5752
#: Format version of the JSON header; flowhost rejects versions it does not know.
FORMAT_VERSION = 1


def _pixels(image):
    """One image (H x W x C float in 0..1) as uint8, the same values SaveImage writes:
    numpy's `np.clip(255. * i, 0, 255).astype(np.uint8)` is multiply, clip, truncate."""
    return image.mul(255.0).clamp_(0.0, 255.0).to(torch.uint8).contiguous().cpu().numpy()


class FlowhostImageOutput:
    CATEGORY = "flowhost"
    DESCRIPTION = "Sends the images to flowhost as raw pixels over the websocket (no PNG, no disk)."
    FUNCTION = "send_images"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to hand to flowhost."}),
                "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": "Names the outputs, as SaveImage's prefix does."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        # The pixels exist only on the socket: a cached (skipped) run would send nothing.
        return float("nan")

    def send_images(self, images, filename_prefix="ComfyUI", unique_id=None):
        srv = server.PromptServer.instance
        context = get_executing_context() if get_executing_context else None
        prompt_id = context.prompt_id if context else getattr(srv, "last_prompt_id", None)
        node_id = str(context.node_id if context else unique_id)
        count = int(images.shape[0])
        sent = []
        for index in range(count):
            pixels = _pixels(images[index])
            if pixels.ndim == 2:
                pixels = pixels[:, :, None]
            height, width, channels = (int(n) for n in pixels.shape)
            filename = f"{filename_prefix}_{index + 1:05}_.png"
            header = json.dumps({
                "version": FORMAT_VERSION,
                "prompt_id": prompt_id,
                "node_id": node_id,
                "index": index,
                "count": count,
                "width": width,
                "height": height,
                "channels": channels,
                "dtype": "uint8",
                "layout": "hwc",
                "filename": filename,
            }).encode("utf-8")
            payload = bytearray(struct.pack(">I", len(header)))
            payload += header
            payload += pixels.tobytes()
            if srv.client_id is None:
                # A prompt without a client: send_sync would broadcast the pixels to every
                # socket. Nobody asked for them; the history lists only what was sent.
                continue
            srv.send_sync(EVENT_RASTER, payload, srv.client_id)
            sent.append({"index": index, "width": width, "height": height, "channels": channels, "name": filename})
        return {"ui": {"flowhost_rasters": sent}}


NODE_CLASS_MAPPINGS = {"FlowhostImageOutput": FlowhostImageOutput}
NODE_DISPLAY_NAME_MAPPINGS = {"FlowhostImageOutput": "flowhost image output"}
