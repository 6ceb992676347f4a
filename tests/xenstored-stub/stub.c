/*
 * LD_PRELOAD stubs that let Debian's C xenstored (xen-utils-4.17,
 * /usr/lib/xen-4.17/bin/xenstored) run without a hypervisor, for tests.
 *
 * What xenstored 4.17 imports from the Xen libraries (nm -D --undefined-only):
 *   libxenctrl:   xc_interface_open, xc_interface_close, xc_domain_getinfo
 *   libxenevtchn: xenevtchn_open, xenevtchn_fdopen, xenevtchn_fd, xenevtchn_bind_virq,
 *                 xenevtchn_bind_interdomain, xenevtchn_notify, xenevtchn_pending,
 *                 xenevtchn_unmask, xenevtchn_unbind
 *   libxengnttab: xengnttab_open, xengnttab_close, xengnttab_set_max_grants,
 *                 xengnttab_map_grant_ref, xengnttab_unmap
 * and at start-up it reads dom0's xenstore event channel from /proc/xen/xsd_port and maps
 * dom0's ring page from /proc/xen/xsd_kva.
 *
 * The stubs: every domain "exists" (so permissions naming guests are kept), event channels
 * are numbers that never fire (the event fd is a pipe nobody writes), the two /proc files are
 * memfds (port 1; a zeroed page, i.e. an idle dom0 ring). Clients talk to xenstored only
 * through its unix socket ($XENSTORED_RUNDIR/socket), as dom0.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xenctrl.h>
#include <xenevtchn.h>
#include <xengnttab.h>

#define NOT_OURS (-2)

static int memfd_with(const char *name, const char *content, size_t size)
{
	int fd = memfd_create(name, MFD_CLOEXEC);
	if (fd < 0)
		return -1;
	if (ftruncate(fd, (off_t)size) != 0)
		goto fail;
	if (content && pwrite(fd, content, strlen(content), 0) != (ssize_t)strlen(content))
		goto fail;
	return fd;
fail:
	close(fd);
	return -1;
}

static int fake_proc(const char *path)
{
	if (path && strcmp(path, "/proc/xen/xsd_port") == 0)
		return memfd_with("xsd_port", "1\n", 2);
	if (path && strcmp(path, "/proc/xen/xsd_kva") == 0)
		return memfd_with("xsd_kva", NULL, 4096);
	return NOT_OURS;
}

static int open_real(const char *sym, const char *path, int flags, mode_t mode)
{
	int (*real)(const char *, int, ...) = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, sym);
	return real(path, flags, mode);
}

int open(const char *path, int flags, ...)
{
	mode_t mode = 0;
	int fd = fake_proc(path);
	if (fd != NOT_OURS)
		return fd;
	if (flags & (O_CREAT | O_TMPFILE)) {
		va_list ap;
		va_start(ap, flags);
		mode = (mode_t)va_arg(ap, int);
		va_end(ap);
	}
	return open_real("open", path, flags, mode);
}

int open64(const char *path, int flags, ...)
{
	mode_t mode = 0;
	int fd = fake_proc(path);
	if (fd != NOT_OURS)
		return fd;
	if (flags & (O_CREAT | O_TMPFILE)) {
		va_list ap;
		va_start(ap, flags);
		mode = (mode_t)va_arg(ap, int);
		va_end(ap);
	}
	return open_real("open64", path, flags, mode);
}

static int handle; /* the address stands in for every opaque handle */

xc_interface *xc_interface_open(xentoollog_logger *logger, xentoollog_logger *dombuild_logger,
				unsigned open_flags)
{
	(void)logger; (void)dombuild_logger; (void)open_flags;
	return (xc_interface *)&handle;
}

int xc_interface_close(xc_interface *xch)
{
	(void)xch;
	return 0;
}

int xc_domain_getinfo(xc_interface *xch, uint32_t first_domid, unsigned int max_doms,
		      xc_dominfo_t *info)
{
	(void)xch;
	if (max_doms < 1 || first_domid >= DOMID_FIRST_RESERVED)
		return 0;
	memset(info, 0, sizeof(*info));
	info->domid = first_domid;
	info->running = 1;
	return 1;
}

static int evt_pipe[2] = { -1, -1 };
static evtchn_port_t next_port = 10;

xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *logger, unsigned open_flags)
{
	(void)logger; (void)open_flags;
	if (evt_pipe[0] < 0 && pipe2(evt_pipe, O_CLOEXEC) != 0)
		return NULL;
	return (xenevtchn_handle *)&handle;
}

xenevtchn_handle *xenevtchn_fdopen(struct xentoollog_logger *logger, int fd, unsigned open_flags)
{
	(void)fd;
	return xenevtchn_open(logger, open_flags);
}

int xenevtchn_fd(xenevtchn_handle *xce)
{
	(void)xce;
	return evt_pipe[0];
}

xenevtchn_port_or_error_t xenevtchn_bind_virq(xenevtchn_handle *xce, unsigned int virq)
{
	(void)xce; (void)virq;
	return (xenevtchn_port_or_error_t)next_port++;
}

xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid,
						     evtchn_port_t remote_port)
{
	(void)xce; (void)domid; (void)remote_port;
	return (xenevtchn_port_or_error_t)next_port++;
}

int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port)
{
	(void)xce; (void)port;
	return 0;
}

xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce)
{
	(void)xce;
	return -1;
}

int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port)
{
	(void)xce; (void)port;
	return 0;
}

int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port)
{
	(void)xce; (void)port;
	return 0;
}

xengnttab_handle *xengnttab_open(struct xentoollog_logger *logger, unsigned open_flags)
{
	(void)logger; (void)open_flags;
	return (xengnttab_handle *)&handle;
}

int xengnttab_close(xengnttab_handle *xgt)
{
	(void)xgt;
	return 0;
}

int xengnttab_set_max_grants(xengnttab_handle *xgt, uint32_t nr_grants)
{
	(void)xgt; (void)nr_grants;
	return 0;
}

/* Only reached by XS_INTRODUCE of a guest, which the tests never send: an idle ring page. */
void *xengnttab_map_grant_ref(xengnttab_handle *xgt, uint32_t domid, uint32_t ref, int prot)
{
	void *p;
	(void)xgt; (void)domid; (void)ref;
	p = mmap(NULL, 4096, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	return p == MAP_FAILED ? NULL : p;
}

int xengnttab_unmap(xengnttab_handle *xgt, void *start_address, uint32_t count)
{
	(void)xgt;
	return munmap(start_address, 4096UL * count);
}
