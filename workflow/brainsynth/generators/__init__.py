"""Generators: brainSPADE (label generator: VAE + latent diffusion; image generator: SPADE VAE-GAN),
gmm (domain-randomised images of the label maps, SynthSeg), lesion_insertion (lesions grown
into real healthy subjects) and spade_diffusion (the label maps imaged by a SPADE diffusion model).

Modules
-------
common           devices, AMP, seeding, checkpoint/resume, loss curves, progress log, data loading
label_generator  :func:`train_label_vae`, :func:`train_label_ldm`, :func:`sample_labels`, conditioning helpers
image_generator  :func:`train_image_generator`, :func:`generate_images`
sampling         :func:`sample_synthetic` (labels -> images -> NIfTI + manifest + montage)
quality          MS-SSIM diversity, MMD, memorisation check, class volume fractions
contract         :func:`check_samples`: the sample files and manifest every generator writes
gmm              :func:`synthesize_gmm`: domain-randomised images of label maps (SynthSeg), no training
lesion_insertion :func:`insert_lesions`: tumours / WMH grown into real healthy subjects, no training
spade_diffusion  :func:`train_spade_diffusion`, :func:`sample_spade_diffusion`: SPADE-normalised diffusion images

Importing this package does not import torch-heavy submodules eagerly; import
the submodule you need.
"""
