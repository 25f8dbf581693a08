//! The layer between the CRI front end and the shims: tasks, shims, bundles, images (issues 3 and 4).
