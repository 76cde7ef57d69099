//! hmm_mirror-style address-space registry. Under construction.
#![deny(missing_docs)]
