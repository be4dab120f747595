// Tooltips for the Delta Sampling panel, keyed by label (A1111's hints.js `titles`).
// Kept equal to lib_delta/spec.py tooltips by tests/test_packaging.py.
(function () {
    const deltaSamplingTitles = {
        "Delta Sampling": "Turn Delta Sampling on for this generation.",
        "DS source": "Base checkpoint the adapter was made for (e.g. SD1.5). Runs beside the active checkpoint.",
        "DS adapter kind": "lora: LoRA/LyCORIS file on the source; checkpoint: a fine-tune of the source; prompt: the same source with the adapted prompt only.",
        "DS adapter": "The LoRA/LyCORIS file or fine-tuned checkpoint whose effect is transferred.",
        "DS adapter weight": "LoRA multiplier applied on the source side.",
        "DS lambda": "lambda: how much of the adapter's effect to add. ~1 within a family, 2-4.5 for SD1.5->SDXL. Negative pushes away from the adapter's effect.",
        "DS schedule": "How lambda changes over the active window of the sampling steps.",
        "DS start": "Fraction of sampling where DS starts.",
        "DS end": "Fraction of sampling where DS stops.",
        "DS base prompt": "Prompt for the source base model; {prompt} stands for each image's own prompt. Empty: the target's prompt.",
        "DS adapted prompt": "Prompt for the adapted source model (add trigger words here); {prompt} stands for each image's own prompt, e.g. '{prompt}, pixel art'. Empty: the base prompt.",
        "DS negative prompt": "Negative prompt for both source models; {prompt} stands for each image's own negative prompt. Empty: the target's negative prompt.",
        "DS source CFG": "CFG scale for the source pair. 0: the target's CFG scale.",
        "DS strength mode": "fixed: lambda as set. auto: lambda is relative to the target's own guidance: each step scales the delta to lambda x the size of the target's CFG update (start at 1).",
        "DS cap": "Limit the added lambda x delta to this multiple of the target's CFG update (against over-saturation at large lambda). 0: no limit.",
        "DS speed": "exact: same result as the plain method. balanced / fast: shortcuts with a measured cost (README, Performance). custom: the knobs below.",
        "DS batched pair": "custom: run base and adapted as one batch where they share weights (same result, more memory per step).",
        "DS cond-only delta": "custom: skip the source's uncond passes (half the source cost, approximate for LoRA).",
        "DS delta every": "custom: compute the delta every k model calls and reuse it in between.",
        "DS native-size source": "custom: run the source at its own trained resolution (e.g. SD1.5 at ~512 px under a 1024 px SDXL target) and scale the delta up.",
        "DS more LoRAs": "More LoRA/LyCORIS files on the adapted side, on top of the adapter (any kind): 'name:weight, name:weight' or <lora:name:weight>. With a checkpoint adapter: a fine-tune plus LoRAs in one adapted branch.",
        "DS ControlNet": "A ControlNet made for the source (e.g. an SD1.5 canny model), on the adapted side only: its effect reaches your image through the delta. Empty: none.",
        "DS ControlNet weight": "How strongly the ControlNet steers the adapted source.",
        "DS ControlNet start": "Fraction of sampling where the ControlNet starts (on the source's noise levels).",
        "DS ControlNet end": "Fraction of sampling where the ControlNet stops.",
        "DS ControlNet preprocessor": "canny: edges of the control image (OpenCV, thresholds 100/200); none: the image is already a control map.",
        "DS ControlNet image": "The control image (not stored in the infotext). Empty in img2img: the img2img input.",
        "DS IP-Adapter": "An IP-Adapter made for the source (e.g. ip-adapter_sd15), on the adapted side only: the reference image steers your image through the delta. Uses the WebUI's CLIP image encoder.",
        "DS IP-Adapter weight": "How strongly the reference image steers the adapted source.",
        "DS IP-Adapter image": "The reference image (not stored in the infotext). Empty in img2img: the img2img input."
    };
    if (typeof titles === "undefined") {
        window.titles = {};
    }
    Object.assign(titles, deltaSamplingTitles);
})();
