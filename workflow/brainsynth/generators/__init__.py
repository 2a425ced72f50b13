"""Generators: brainSPADE (label generator: VAE + latent diffusion; image generator: SPADE VAE-GAN),
gmm (domain-randomised images of the label maps, SynthSeg), lesion_insertion (lesions grown
into real healthy subjects) and spade_diffusion (the label maps imaged by a SPADE diffusion model).

Modules
-------
common           devices, AMP, seeding, checkpoint/resume, loss curves, progress log, data loading
contract         :func:`check_samples`, :func:`write_montage`: the sample files, manifest and montage every
                 generator writes
brainspade/      the study's generator: label_generator (VAE + LDM), image_generator (SPADE), sampling,
                 settings (checks run when the workflow starts)
quality          MS-SSIM diversity, MMD, memorisation check, class volume fractions
label_quality    the label generator's fidelity audit and the per-sample QC
gmm              :func:`synthesize_gmm`: domain-randomised images of label maps (SynthSeg), no training
lesion_insertion :func:`insert_lesions`: tumours / WMH grown into real healthy subjects, no training
spade_diffusion  :func:`train_spade_diffusion`, :func:`sample_spade_diffusion`: SPADE-normalised diffusion images

Importing this package does not import torch-heavy submodules eagerly; import
the submodule you need.
"""
