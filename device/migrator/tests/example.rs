//! Runs the embedding example (`examples/embed.rs`): the balloon device
//! and the migrator over vm-memory, the driver model as the guest, an
//! in-process receiver, page-by-page comparison.

#[path = "../examples/embed.rs"]
#[allow(dead_code)]
mod embed;

#[test]
fn the_embedding_example_migrates_every_page() {
    let Some(outcome) = embed::run().unwrap() else {
        eprintln!("SKIPPED: userfaultfd is not available to this process");
        return;
    };
    assert_eq!(outcome.pages_differing, 0, "{outcome:?}");
    assert_eq!(outcome.pages_compared, (48 << 20) / 4096);
    assert!(
        outcome.guest_writes > 0 && outcome.balloon_rounds > 0,
        "{outcome:?}"
    );
}
