#![no_std]
//! Placeholder, replaced by its owner.
