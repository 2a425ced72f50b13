"""brainSPADE, the study's generator: label maps from a latent diffusion model conditioned on
lesion proportions, imaged by a SPADE VAE-GAN styled by real slices.

label_generator  :func:`train_label_vae`, :func:`train_label_ldm`, :func:`sample_labels`, conditioning helpers
image_generator  :func:`train_image_generator`, :func:`generate_images`
sampling         :func:`sample_synthetic` (labels -> images -> the sample contract), :func:`restyle_synthetic`
settings         :func:`check_settings`: the label generator's per-lesion-type settings, checked without torch
sampling_calibration  :func:`fit_sampling_calibration`: what sampling decodes with, fitted per trained model:
                 tissue offsets (tissue_fit) and a random smooth deformation of each map (deformation)
"""
