"""Defaults shared by every config in `configs/`; each config file overrides what it needs.

The config is locked and type-safe: setting a key that is not here, or a value of another
type, fails loudly (in a config file, in Python or as a --config.* flag). Fields that may be
None are placeholders. `config_checks.check_config` checks what the types cannot.
Units: resolutions in pixels, learning rates per step, intervals in training steps.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Every key with its default, locked."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = d = ml_collections.ConfigDict()
    d.name = "fashion_mnist"
    d.data_dir = ml_collections.config_dict.placeholder(str)  # None: tfds's default folder
    d.image_size = 32
    d.channels = 1
    d.random_flip = False
    d.crop = "diffae"  # celeb_a only
    d.source = "auto"  # fashion_mnist only: auto | tfds | debian | bundled
    d.debian_dir = "/usr/share/datasets/fashion-mnist"
    d.download = False  # let tfds download cifar10 / fashion_mnist(source=tfds) itself
    # image_folder only:
    d.image_dir = ml_collections.config_dict.placeholder(str)  # folder, searched recursively
    d.test_fraction = 0.1  # share of the files in the "test" split (seeded permutation)
    d.split_seed = 0  # seed of that train/test permutation
    d.bad_images = "skip"  # corrupt/undecodable file: skip | error
    d.convert_channels = True  # gray<->RGB, alpha on black; False: wrong channels = bad image
    d.wrong_size = "resize"  # not image_size^2: resize (centre crop + resize) | skip | error

    c.model = m = ml_collections.ConfigDict()
    m.latent_type = "binary"  # binary | gaussian | none
    m.latent_dim = 16  # |z|
    # cross_attention | time_embedding | none; diffusers_unet: cross_attention | z_with_t
    # (z projected and added to the time embedding) | z_concat (concatenated to it) | none
    m.conditioning = "cross_attention"
    m.token_dim = 128
    m.token_mlp = False
    m.token_init_scale = 1.0  # std of the z-token vectors (pos, on, off) at initialisation
    # training bits: bernoulli (b ~ Bern(p), straight-through) | threshold (1[p > 0.5],
    # straight-through) | gumbel_softmax (the authors': a soft relaxed sample, no straight-through)
    m.binary_estimator = "bernoulli"
    m.gumbel_temperature = 1.0  # gumbel_softmax only
    m.gumbel_eval = "argmax"  # gumbel_softmax at evaluation: argmax (1[p > 0.5]) | sample (authors)
    # how z becomes cross-attention tokens: per_bit (|z| tokens pos + z on + (1 - z) off) |
    # one_hot_single (the authors': one token, the 2|z| vector of (off, on) pairs)
    m.z_tokens = "per_bit"
    m.backbone = "iddpm_unet"  # iddpm_unet | diffusers_unet (the authors' UNet2DConditionModel)
    # diffusers_unet only (diffusers' UNet2DConditionModel arguments of the same names):
    m.diffusers = h = ml_collections.ConfigDict()
    h.attention_head_dim = 8  # diffusers' name: the head COUNT of cross-attention blocks
    h.flip_sin_to_cos = True
    h.freq_shift = 0
    h.downsample_padding = 1
    h.norm_eps = 1e-5
    h.mid_attention = False  # UNetMidBlock2D with attention (the HF DDPM checkpoints' layout)
    m.model_channels = 128
    m.channel_mult = (1, 2, 2, 2)
    m.num_res_blocks = 3
    m.attention_resolutions = (16, 8)
    m.cross_attention_resolutions = ml_collections.config_dict.placeholder(tuple)  # None: same
    m.num_heads = 4
    m.dropout = 0.3
    m.learn_sigma = True
    m.use_scale_shift_norm = True
    m.num_groups = 32
    # Memory and precision (README "Memory and precision knobs"); the defaults are exact:
    m.dtype = "float32"  # compute: float32 | bfloat16 (params, optimizer state stay float32)
    m.remat = False  # recompute ResBlock/attention activations in the backward pass
    m.attention_impl = "xla"  # xla | dot_product_attention (jax.nn.dot_product_attention)
    m.encoder = e = ml_collections.ConfigDict()
    e.type = "resblocks"  # resblocks (ours) | conv_bn (the authors': Conv-BN-LeakyReLU to 2x2)
    e.model_channels = 64  # conv_bn: the first width, doubled per stride-2 conv
    e.channel_mult = (1, 2, 2, 2)
    e.num_res_blocks = 2
    e.attention_resolutions = ()
    e.dropout = 0.0
    e.center_examples = 0  # >0: centre each logit's bias on this many images at init

    c.diffusion = f = ml_collections.ConfigDict()
    f.schedule = "cosine"  # cosine | linear
    f.num_timesteps = 1000
    f.rescale_timesteps = False
    f.vlb_weight = 0.001
    # learned_range (I-DDPM's hybrid loss) | fixed_small | fixed_large (MSE-only loss);
    # learned_range needs model.learn_sigma=True, the fixed ones learn_sigma=False
    f.variance = "learned_range"
    f.input_perturbation = 0.0  # DDPM-IP's gamma: x_t from eps + gamma * xi, target eps

    c.training = t = ml_collections.ConfigDict()
    t.batch_size = 128  # global, over all devices and hosts
    t.grad_accum_steps = 1  # microbatches of batch_size / this, gradients averaged in-step
    t.num_steps = 500_000
    t.learning_rate = 1e-4
    t.weight_decay = 0.0
    t.warmup_steps = 0
    t.grad_clip = 1.0  # max global gradient norm; 0.0: no clipping
    t.timestep_sampler = "uniform"  # uniform | loss_second_moment (I-DDPM's importance sampler)
    t.encoder_lr_scale = 1.0  # the encoder's learning rate relative to learning_rate
    t.ema_decay = 0.9999
    t.ema_warmup = True  # decay min(ema_decay, (1 + step) / (10 + step)); False: I-DDPM's
    t.log_every = 100
    t.checkpoint_every = 5_000
    t.sample_every = 20_000
    t.keep_checkpoints = 3
    t.max_nonfinite_steps = 10  # stop after this many non-finite steps in a row
    # a --workdir whose newest checkpoint's parameters a new run starts from (fine-tuning,
    # e.g. at 256x256 from 64x64; dmz_jax/warm_start.py); ignored once this run has its own
    t.init_from = ml_collections.config_dict.placeholder(str)

    c.sampling = s = ml_collections.ConfigDict()
    s.num_samples = 64
    s.steps = (10, 100)  # respaced step counts for the sample grids
    s.method = "ancestral"  # ancestral | ddim
    s.eta = 0.0
    s.clip_denoised = True
    s.prior = "bernoulli"  # z for generation: bernoulli | empirical | learned | dataset
    s.batch_size = 64  # images per compiled batch in the modes and the API (x devices)
    s.seed = 0  # of the modes' noise and priors

    c.modes = o = ml_collections.ConfigDict()  # options of --mode=...
    o.split = "test"  # encode / reconstruct / interpolate / manipulate read this split
    o.num_images = 16  # images a mode shows (reconstruct, interpolate pairs x 2, manipulate)
    o.steps = 100  # K of the deterministic DDIM inversion and decoding
    o.frames = 8  # interpolate: frames from a to b
    o.path = "bits"  # interpolate: bits (flips, least confident first) | tokens (mixing)
    o.x_T = "slerp"  # interpolate: slerp (between the inverted x_T) | fixed (a's)
    o.label = ml_collections.config_dict.placeholder(str)  # manipulate: a class / attribute
    o.scales = (-2.0, -1.0, 0.0, 1.0, 2.0)  # manipulate: moves along the classifier direction
    o.bits = ()  # manipulate: flip these bits (indices into z), one row each, instead
    o.prior_steps = 2000  # train_prior: optimizer steps of the bit prior
    o.prior_width = 64  # train_prior: transformer width (2 layers, 4 heads)
    # --mode=mutual_information: MINE's Donsker-Varadhan bound on I(x_t; z) along the chain
    o.mi = m = ml_collections.ConfigDict()
    m.t_fractions = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)  # t / T
    m.chains = ("forward", "reverse")  # q_sample of real images | DMZ's own ancestral chain
    m.reverse_steps = 100  # K of the reverse chain (the authors': 100)
    m.train_examples = 2000  # (x_t, z) pairs the critic trains on, from the train split
    m.test_examples = 1000  # held-out pairs (test split) on which the bound is reported
    m.steps = 2000  # critic optimizer steps per t and seed
    m.batch_size = 64
    m.width = 100  # critic: MLP([x_t, z] -> width -> width -> 1), the authors'
    m.learning_rate = 1e-4
    m.ema_rate = 0.01  # MINE's moving average of E[exp T] in the bias-corrected gradient
    m.seeds = 3  # critics per (chain, t): the bound's spread across them is reported
    # --mode=bits: what each bit means
    o.per_bit = b = ml_collections.ConfigDict()
    b.examples = 2000  # images of modes.split whose codes give means, correlations, MI
    b.flip_images = 4  # images per bit-flip row (decoded with their own inverted x_T)
    b.flip_bits = ()  # the bits shown flipped, one row each; (): every bit
    # --mode=train_bridge / translate: image-to-image through a code bridge (the paper's
    # Edges2Handbags): the source model's bits -> an MLP -> this (target) model's bits
    o.bridge = r = ml_collections.ConfigDict()
    r.source_workdir = ml_collections.config_dict.placeholder(str)  # the source-domain DMZ
    r.hidden = (256, 256, 256, 256)  # Linear -> BatchNorm -> ReLU per width, the authors'
    r.learning_rate = 1e-3
    r.batch_size = 256
    r.max_epochs = 100
    r.patience = 10  # stop after this many epochs without a better validation bit accuracy
    r.validation_fraction = 0.1  # of the training pairs, held out for early stopping
    r.train_examples = -1  # training pairs used (-1: all)
    r.steps = 40  # K of the translation's ancestral sampler (the authors': 40)
    r.num_images = 16  # translate: images in the PNG grid
    r.translate_examples = 1000  # translate: images of modes.split translated and scored
    # translate: a folder of source-domain images (unpaired: translations, grid and FD, no
    # paired metrics) instead of modes.split of the source model's dataset
    r.source_dir = ml_collections.config_dict.placeholder(str)

    c.eval = v = ml_collections.ConfigDict()
    v.probe_train_examples = 10_000
    v.probe_test_examples = 10_000
    v.encode_batch_size = 512  # divisible by 8 devices
    v.at_end = True  # sample grids and the linear probe when training ends
    v.probe_at_init = True  # also probe the untrained encoder (the baseline), in summary.json
    # --mode=evaluate:
    v.fd_steps = (10, 20, 50, 100)  # K of the Frechet distances
    v.fd_num_samples = 50_000  # generated images per Frechet distance (and real ones)
    v.fd_features = "auto"  # inception | classifier | auto (inception when weights are set)
    v.inception_weights = ml_collections.config_dict.placeholder(str)  # converted .npz
    v.classifier_steps = 2_000  # training steps of the classifier feature network
    v.nll_examples = 1_000  # test images of the NLL (the full VLB: T network calls each)
    v.recon_examples = 1_000  # test images of the reconstruction metrics
    # dmz_jax | authors (their FID sample count and reference set, probe on soft codes with
    # 5-fold CV over train and test together, NLL with soft z)
    v.protocol = "dmz_jax"
    v.neighbour_bits = 2  # prior_fit: a sample is "near" a training code within this many bits

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by other axes
    c.mesh.fsdp = 1  # > 1: the train state split that many ways (dmz_jax/sharding.py)
    c.lock()
    return c


def tiny(c: ml_collections.ConfigDict) -> None:
    """Shrinks `c` in place to a run that compiles in seconds (tests, smoke runs).

    Denoiser and encoder: 16 channels, 2 levels, 1 res block; self- and cross-attention at
    data.image_size // 2 (pixels) with 2 heads, 8 GroupNorm groups; |z| = 8, tokens of width
    16; T = 50; 4 steps of batch 8, checkpoints every 2; 4 samples at K = 2 and 5.
    """
    c.model.update(latent_dim=8, token_dim=16, model_channels=16, channel_mult=(1, 2),
                   num_res_blocks=1, attention_resolutions=(c.data.image_size // 2,),
                   num_heads=2, num_groups=8)
    c.model.cross_attention_resolutions = None  # the same as attention_resolutions
    c.model.encoder.update(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=())
    c.diffusion.update(num_timesteps=50, rescale_timesteps=False)
    c.training.update(batch_size=8, warmup_steps=0, num_steps=4, log_every=2,
                      checkpoint_every=2)
    c.sampling.update(num_samples=4, steps=(2, 5))
    c.eval.update(probe_train_examples=200, probe_test_examples=100, encode_batch_size=40)
