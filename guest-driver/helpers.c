// SPDX-License-Identifier: GPL-2.0
/*
 * C shims for freehint.ko: one-line wrappers around static inline functions
 * and macros that Rust cannot call, in the style of the kernel's rust/helpers/, plus
 * the debugfs plumbing that forwards file operations to Rust entry points.
 * Nothing here makes a decision; every rule lives in the Rust code.
 */

#include <linux/debugfs.h>
#include <linux/delay.h>
#include <linux/jiffies.h>
#include <linux/err.h>
#include <linux/fs.h>
#include <linux/ktime.h>
#include <linux/list.h>
#include <linux/mm.h>
#include <linux/mmzone.h>
#include <linux/module.h>
#include <linux/nodemask.h>
#include <linux/cpumask.h>
#include <linux/percpu.h>
#include <linux/huge_mm.h>
#include <linux/page-flags.h>
#include <linux/sched.h>
#include <linux/spinlock.h>
#include <linux/version.h>
#include <linux/vmstat.h>
#include <asm/msr.h>
#include <asm/tsc.h>

#include "freehint.h"

/*
 * A spinlock taken with interrupts saved and disabled: zone->lock (as
 * mm/page_alloc.c; 7.3 on, zone.rs uses kernel::sync::SpinLockIrq on it
 * instead) and the stop lock of virtio/objects.rs (the stats queue's
 * callback takes it in interrupt context).
 */
unsigned long freehint_spin_lock_irqsave(spinlock_t *lock)
{
	unsigned long flags;

	spin_lock_irqsave(lock, flags);
	return flags;
}

void freehint_spin_unlock_irqrestore(spinlock_t *lock, unsigned long flags)
{
	spin_unlock_irqrestore(lock, flags);
}

/* Nodes and zones (for_each_online_node / NODE_DATA are macros). */
int freehint_nr_node_ids(void)
{
	return nr_node_ids;
}

bool freehint_node_online(int nid)
{
	return node_online(nid);
}

struct pglist_data *freehint_node_data(int nid)
{
	return NODE_DATA(nid);
}

bool freehint_zone_populated(struct zone *zone)
{
	return populated_zone(zone);
}

/* Free-list entries and the pages they are embedded in. */
struct list_head *freehint_free_list_head(struct zone *zone, unsigned int order,
					  unsigned int mt)
{
	return &zone->free_area[order].free_list[mt];
}

struct page *freehint_buddy_list_page(struct list_head *entry)
{
	return list_entry(entry, struct page, buddy_list);
}

struct list_head *freehint_page_buddy_list(struct page *page)
{
	return &page->buddy_list;
}

unsigned long freehint_page_to_pfn(const struct page *page)
{
	return page_to_pfn(page);
}

bool freehint_pfn_valid(unsigned long pfn)
{
	return pfn_valid(pfn);
}

struct page *freehint_pfn_to_page(unsigned long pfn)
{
	return pfn_to_page(pfn);
}

bool freehint_page_buddy(const struct page *page)
{
	return PageBuddy(page);
}

unsigned long freehint_page_private(const struct page *page)
{
	return page_private(page);
}

struct zone *freehint_page_zone(const struct page *page)
{
	return page_zone(page);
}

/* Per-CPU page lists (free order-0..3 pages cached per CPU, not on the buddy lists). */
int freehint_next_online_cpu(int cpu)
{
	return cpumask_next(cpu, cpu_online_mask);
}

#if LINUX_VERSION_CODE < KERNEL_VERSION(7, 3, 0)
/* 7.3 on: kernel::cpu::nr_cpu_ids(). */
unsigned int freehint_nr_cpu_ids(void)
{
	return nr_cpu_ids;
}
#endif

struct per_cpu_pages *freehint_zone_pcp(struct zone *zone, int cpu)
{
	return per_cpu_ptr(zone->per_cpu_pageset, cpu);
}

#if LINUX_VERSION_CODE < KERNEL_VERSION(7, 3, 0)
/*
 * As the kernel's remote drain does (pcp_spin_lock_maybe_irqsave() in
 * mm/page_alloc.c): plain spin_lock on SMP, where interrupt-context users
 * only trylock pcp->lock; irqsave on UP, where a trylock always succeeds.
 * 7.3 on: zone.rs uses kernel::sync::SpinLock on it instead.
 */
unsigned long freehint_pcp_lock(struct per_cpu_pages *pcp)
{
	unsigned long flags = 0;

#if defined(CONFIG_SMP) || defined(CONFIG_PREEMPT_RT)
	spin_lock(&pcp->lock);
#else
	spin_lock_irqsave(&pcp->lock, flags);
#endif
	return flags;
}

void freehint_pcp_unlock(struct per_cpu_pages *pcp, unsigned long flags)
{
#if defined(CONFIG_SMP) || defined(CONFIG_PREEMPT_RT)
	spin_unlock(&pcp->lock);
#else
	spin_unlock_irqrestore(&pcp->lock, flags);
#endif
}
#endif

unsigned int freehint_nr_pcp_lists(void)
{
	return NR_PCP_LISTS;
}

struct list_head *freehint_pcp_list_head(struct per_cpu_pages *pcp, unsigned int pindex)
{
	return &pcp->lists[pindex];
}

size_t freehint_pcp_lists_size(void)
{
	return sizeof(((struct per_cpu_pages *)0)->lists);
}

struct page *freehint_pcp_list_page(struct list_head *entry)
{
	return list_entry(entry, struct page, pcp_list);
}

/* Pages (not entries) on all lists of one pcp; caller holds pcp->lock. */
int freehint_pcp_count(struct per_cpu_pages *pcp)
{
	return pcp->count;
}

/*
 * list_bulk_move_tail() (a static inline): moves the run first..last of
 * head's list to its tail. Caller holds the lock protecting the list.
 */
void freehint_list_bulk_move_tail(struct list_head *head, struct list_head *first,
				  struct list_head *last)
{
	list_bulk_move_tail(head, first, last);
}

/* mm/page_alloc.c pindex_to_order() (static there), for 6.12. */
unsigned int freehint_pcp_pindex_order(unsigned int pindex)
{
#ifdef CONFIG_TRANSPARENT_HUGEPAGE
	if (pindex >= NR_LOWORDER_PCP_LISTS)
		return HPAGE_PMD_ORDER;
#endif
	return pindex / MIGRATE_PCPTYPES;
}

unsigned int freehint_nr_page_orders(void)
{
	return NR_PAGE_ORDERS;
}

unsigned int freehint_migrate_types(void)
{
	return MIGRATE_TYPES;
}

u64 freehint_rdtsc(void)
{
	return rdtsc_ordered();
}

unsigned int freehint_tsc_khz(void)
{
	return tsc_khz;
}

unsigned long freehint_jiffies(void)
{
	return READ_ONCE(jiffies);
}

unsigned int freehint_hz(void)
{
	return HZ;
}

#if LINUX_VERSION_CODE < KERNEL_VERSION(7, 3, 0)
/* 7.3 on: kernel::time::delay::fsleep(). */
void freehint_sleep_ms(unsigned int ms)
{
	msleep(ms);
}
#endif

void freehint_cond_resched(void)
{
	cond_resched();
}

/*
 * debugfs plumbing: every file forwards to the Rust entry points. Only for
 * kernels without the Rust debugfs abstraction; from 7.3 on debugfs.rs uses
 * kernel::debugfs instead.
 */
#if LINUX_VERSION_CODE < KERNEL_VERSION(7, 3, 0)
static ssize_t freehint_fop_read(struct file *file, char __user *buf, size_t count,
				 loff_t *ppos)
{
	return freehint_rust_read(file->private_data, buf, count, ppos);
}

static ssize_t freehint_fop_write(struct file *file, const char __user *buf,
				  size_t count, loff_t *ppos)
{
	return freehint_rust_write(file->private_data, buf, count, ppos);
}

static const struct file_operations freehint_fops = {
	.owner = THIS_MODULE,
	.open = simple_open,
	.read = freehint_fop_read,
	.write = freehint_fop_write,
	.llseek = default_llseek,
};

struct dentry *freehint_debugfs_dir(const char *name)
{
	return debugfs_create_dir(name, NULL);
}

struct dentry *freehint_debugfs_file(const char *name, umode_t mode,
				     struct dentry *dir, void *ctx)
{
	return debugfs_create_file(name, mode, dir, ctx, &freehint_fops);
}

void freehint_debugfs_remove(struct dentry *dir)
{
	debugfs_remove_recursive(dir);
}

bool freehint_is_err_or_null(const void *ptr)
{
	return IS_ERR_OR_NULL(ptr);
}
#endif

/* mm.rs: the balloon page list, poisoning, memory figures. */
void freehint_page_list_add(struct list_head *head, struct page *page)
{
	list_add(&page->lru, head);
}

struct page *freehint_page_list_pop(struct list_head *head)
{
	struct page *page = list_first_entry_or_null(head, struct page, lru);

	if (page)
		list_del(&page->lru);
	return page;
}

bool freehint_page_poisoning_enabled(void)
{
	return page_poisoning_enabled_static();
}

bool freehint_want_init_on_free(void)
{
	return want_init_on_free();
}

unsigned long freehint_file_pages(void)
{
	return global_node_page_state(NR_FILE_PAGES);
}

/*
 * The VM event counters the stats queue reports, in the order of mm.rs
 * (major faults, minor faults, pages swapped in, out, OOM kills); false
 * without CONFIG_VM_EVENT_COUNTERS.
 */
bool freehint_vm_events(u64 *out, unsigned int n)
{
#ifdef CONFIG_VM_EVENT_COUNTERS
	unsigned long events[NR_VM_EVENT_ITEMS];

	if (n != 5)
		return false;
	all_vm_events(events);
	out[0] = events[PGMAJFAULT];
	out[1] = events[PGFAULT];
	out[2] = events[PSWPIN];
	out[3] = events[PSWPOUT];
	out[4] = events[OOM_KILL];
	return true;
#else
	return false;
#endif
}
