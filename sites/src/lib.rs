//! Ready-made altpatch sites (being written).
