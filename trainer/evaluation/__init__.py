"""Sample-quality metrics: mode coverage on 2-D mixtures, FID/KID/precision-recall on images."""
