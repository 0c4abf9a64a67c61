// Command vcsim-ferry is VMware's vCenter simulator (govmomi's simulator package, as
// vcsim) with changed block tracking added: changeIds on snapshot disks and
// VirtualMachine.QueryChangedDiskAreas answered from the disks' real backing files.
// vmferry's tests start it; see README.md for the design and its limits.
//
// Once it listens it prints one JSON line to stdout, {"url": ..., "pid": ...}, and
// nothing else; logs go to stderr. SIGTERM or SIGINT stops it (exit status 0).
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"

	// The optional endpoints VMware's vcsim registers too (vAPI REST, PBM, lookup, STS, CNS).
	_ "github.com/vmware/govmomi/cns/simulator"
	_ "github.com/vmware/govmomi/lookup/simulator"
	_ "github.com/vmware/govmomi/pbm/simulator"
	_ "github.com/vmware/govmomi/sts/simulator"
	_ "github.com/vmware/govmomi/vapi/cluster/simulator"
	_ "github.com/vmware/govmomi/vapi/namespace/simulator"
	_ "github.com/vmware/govmomi/vapi/simulator"
)

// datastoreFlags collects repeated -datastore NAME=DIR options.
type datastoreFlags []datastoreSpec

type datastoreSpec struct{ name, dir string }

func (d *datastoreFlags) String() string { return fmt.Sprint(*d) }

func (d *datastoreFlags) Set(value string) error {
	name, dir, ok := strings.Cut(value, "=")
	if !ok || name == "" || dir == "" {
		return fmt.Errorf("want NAME=DIR, got %q", value)
	}
	*d = append(*d, datastoreSpec{name: name, dir: dir})
	return nil
}

type options struct {
	listen       string
	username     string
	passwordFile string
	certOut      string
	datastores   datastoreFlags
	trace        bool
	blockSize    int64
	pageSpan     int64
	pageExtents  int
	model        *simulator.Model
}

func parseFlags() *options {
	o := &options{model: simulator.VPX()}
	flag.StringVar(&o.listen, "l", "127.0.0.1:0", "listen address (port 0: any free port)")
	flag.StringVar(&o.username, "username", "user", "login user name (used with -password-file)")
	flag.StringVar(&o.passwordFile, "password-file", "",
		"file holding the only accepted password; without it any non-empty credentials log in")
	flag.StringVar(&o.certOut, "cert-out", "", "write the server's (generated) PEM certificate to this file")
	flag.Var(&o.datastores, "datastore", "NAME=DIR: a local datastore over DIR on every host (repeatable)")
	flag.BoolVar(&o.trace, "trace", false, "log every SOAP request and response to stderr")
	flag.Int64Var(&o.blockSize, "cbt-block-size", 64*1024, "change tracking granularity in bytes")
	flag.Int64Var(&o.pageSpan, "cbt-page-span", 1<<30, "most disk bytes one QueryChangedDiskAreas answer covers")
	flag.IntVar(&o.pageExtents, "cbt-page-extents", 1024, "most changed areas in one QueryChangedDiskAreas answer")
	// The inventory knobs of VMware's vcsim, with its defaults.
	flag.IntVar(&o.model.Cluster, "cluster", o.model.Cluster, "clusters per datacenter")
	flag.IntVar(&o.model.ClusterHost, "host", o.model.ClusterHost, "hosts per cluster")
	flag.IntVar(&o.model.Host, "standalone-host", o.model.Host, "standalone hosts per datacenter")
	flag.IntVar(&o.model.Machine, "vm", o.model.Machine, "VMs per resource pool (needs -ds > 0)")
	flag.IntVar(&o.model.Datastore, "ds", o.model.Datastore, "vcsim datastores (temporary folders)")
	flag.IntVar(&o.model.Portgroup, "pg", o.model.Portgroup, "distributed port groups per datacenter")
	flag.Parse()
	if o.blockSize <= 0 || o.blockSize%512 != 0 {
		log.Fatalf("-cbt-block-size must be a positive multiple of 512, not %d", o.blockSize)
	}
	if o.pageSpan < o.blockSize || o.pageExtents < 1 {
		log.Fatal("-cbt-page-span must be at least one block and -cbt-page-extents at least 1")
	}
	return o
}

func main() {
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	o := parseFlags()
	simulator.Trace = o.trace
	simulator.TraceFile = os.Stderr

	model := o.model
	if err := model.Create(); err != nil {
		log.Fatalf("creating the inventory: %v", err)
	}
	defer model.Remove()
	if err := addDatastores(model.Service, o.datastores); err != nil {
		log.Fatalf("adding datastores: %v", err)
	}

	// Create() made a new registry: hook into this one.
	cbt := newTracker(o.blockSize, o.pageSpan, o.pageExtents)
	simulator.Map.AddHandler(cbt)

	server, err := serve(model.Service, cbt, o)
	if err != nil {
		log.Fatal(err)
	}
	defer server.Close()

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	public := *server.URL // the same URL value vcsim checks logins against
	public.User = nil     // the password stays out of the ready line
	ready := map[string]any{"url": public.String(), "pid": os.Getpid()}
	if err := json.NewEncoder(os.Stdout).Encode(ready); err != nil {
		log.Fatal(err)
	}
	<-stop
}

// serve starts the HTTPS server with a fresh certificate and the CBT router in front of
// vcsim's SOAP handler.
func serve(service *simulator.Service, cbt *tracker, o *options) (*simulator.Server, error) {
	certificate, certPEM, err := selfSignedCertificate()
	if err != nil {
		return nil, err
	}
	if o.certOut != "" {
		if err := os.WriteFile(o.certOut, certPEM, 0o644); err != nil {
			return nil, err
		}
	}
	service.TLS = &tls.Config{Certificates: []tls.Certificate{certificate}}

	service.Listen = &url.URL{Host: o.listen}
	if o.passwordFile != "" {
		password, err := os.ReadFile(o.passwordFile)
		if err != nil {
			return nil, err
		}
		service.Listen.User = url.UserPassword(o.username, strings.TrimRight(string(password), "\r\n"))
	}

	// vcsim registers its own handler for the SDK paths on this mux (NewServer). A
	// pattern with a host name takes precedence over one without in net/http, so the
	// router gets the requests addressed to these hosts, which covers every client
	// that connects to 127.0.0.1 or localhost; see README.md.
	mux := http.NewServeMux()
	front := &router{service: service, tracker: cbt}
	for _, host := range sdkHosts(o.listen) {
		for _, path := range []string{simulator.Map.Path, simulator.Map.Path + "/vimService"} {
			mux.Handle(host+path, front)
		}
	}
	service.ServeMux = mux
	service.RegisterEndpoints = true
	return service.NewServer(), nil
}

// sdkHosts lists the Host header names (without port) routed through the CBT router.
func sdkHosts(listen string) []string {
	hosts := []string{"127.0.0.1", "localhost", "::1"}
	if host, _, err := net.SplitHostPort(listen); err == nil && host != "" {
		for _, known := range hosts {
			if known == host {
				return hosts
			}
		}
		hosts = append(hosts, host)
	}
	return hosts
}

// addDatastores creates local datastores over the given folders on every host, with
// an in-process client (the same way vcsim's model creates its own datastores).
func addDatastores(service *simulator.Service, specs datastoreFlags) error {
	if len(specs) == 0 {
		return nil
	}
	ctx := context.Background()
	client, err := vim25.NewClient(ctx, service)
	if err != nil {
		return err
	}
	for _, spec := range specs {
		if err := os.MkdirAll(spec.dir, 0o755); err != nil {
			return err
		}
		for _, host := range simulator.Map.All("HostSystem") {
			system, err := object.NewHostSystem(client, host.Reference()).ConfigManager().DatastoreSystem(ctx)
			if err != nil {
				return err
			}
			if _, err := system.CreateLocalDatastore(ctx, spec.name, spec.dir); err != nil {
				return fmt.Errorf("datastore %s on %s: %w", spec.name, host.Reference().Value, err)
			}
		}
	}
	return nil
}
