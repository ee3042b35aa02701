/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The interface between helpers.c and the Rust crate of freehint.ko.
 * Rust declares the same functions in `extern "C"` blocks (zone.rs, mm.rs,
 * clock.rs, debugfs.rs); keep both in sync.
 */
#ifndef FREEHINT_H
#define FREEHINT_H

#include <linux/fs.h>
#include <linux/spinlock_types.h>
#include <linux/types.h>
#include <linux/version.h>

struct dentry;
struct list_head;
struct page;
struct per_cpu_pages;
struct pglist_data;
struct zone;

/* helpers.c: shims around static inlines and macros. */
#if LINUX_VERSION_CODE < KERNEL_VERSION(7, 3, 0)
/* Only where the kernel crate has no abstraction for them (6.12). */
unsigned int freehint_nr_cpu_ids(void);
unsigned long freehint_pcp_lock(struct per_cpu_pages *pcp);
void freehint_pcp_unlock(struct per_cpu_pages *pcp, unsigned long flags);
void freehint_sleep_ms(unsigned int ms);
#endif
int freehint_nr_node_ids(void);
bool freehint_node_online(int nid);
struct pglist_data *freehint_node_data(int nid);
bool freehint_zone_populated(struct zone *zone);
struct list_head *freehint_free_list_head(struct zone *zone, unsigned int order,
					  unsigned int mt);
struct page *freehint_buddy_list_page(struct list_head *entry);
struct list_head *freehint_page_buddy_list(struct page *page);
unsigned long freehint_page_to_pfn(const struct page *page);
bool freehint_pfn_valid(unsigned long pfn);
struct page *freehint_pfn_to_page(unsigned long pfn);
bool freehint_page_buddy(const struct page *page);
unsigned long freehint_page_private(const struct page *page);
struct zone *freehint_page_zone(const struct page *page);
int freehint_next_online_cpu(int cpu);
struct per_cpu_pages *freehint_zone_pcp(struct zone *zone, int cpu);
unsigned int freehint_nr_pcp_lists(void);
struct list_head *freehint_pcp_list_head(struct per_cpu_pages *pcp, unsigned int pindex);
size_t freehint_pcp_lists_size(void);
struct page *freehint_pcp_list_page(struct list_head *entry);
unsigned int freehint_pcp_pindex_order(unsigned int pindex);
int freehint_pcp_count(struct per_cpu_pages *pcp);
void freehint_list_bulk_move_tail(struct list_head *head, struct list_head *first,
				  struct list_head *last);
unsigned int freehint_nr_page_orders(void);
unsigned int freehint_migrate_types(void);
u64 freehint_rdtsc(void);
unsigned int freehint_tsc_khz(void);
unsigned long freehint_jiffies(void);
unsigned int freehint_hz(void);
void freehint_cond_resched(void);
unsigned long freehint_spin_lock_irqsave(spinlock_t *lock);
void freehint_spin_unlock_irqrestore(spinlock_t *lock, unsigned long flags);
/* helpers.c, for mm.rs: balloon page list, poisoning, memory figures. */
void freehint_page_list_add(struct list_head *head, struct page *page);
struct page *freehint_page_list_pop(struct list_head *head);
bool freehint_page_poisoning_enabled(void);
bool freehint_want_init_on_free(void);
unsigned long freehint_file_pages(void);
bool freehint_vm_events(u64 *out, unsigned int n);
#if LINUX_VERSION_CODE < KERNEL_VERSION(7, 3, 0)
/* helpers.c: debugfs plumbing (7.3 on: kernel::debugfs in debugfs.rs). */
struct dentry *freehint_debugfs_dir(const char *name);
struct dentry *freehint_debugfs_file(const char *name, umode_t mode,
				     struct dentry *dir, void *ctx);
void freehint_debugfs_remove(struct dentry *dir);
bool freehint_is_err_or_null(const void *ptr);

/* debugfs.rs: file operations implemented in Rust. */
ssize_t freehint_rust_read(void *ctx, char __user *buf, size_t count, loff_t *ppos);
ssize_t freehint_rust_write(void *ctx, const char __user *buf, size_t count,
			    loff_t *ppos);
#endif

#endif /* FREEHINT_H */
