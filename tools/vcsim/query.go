// QueryChangedDiskAreas on VirtualMachines, which vcsim does not implement.
//
// vcsim dispatches a SOAP call to the method of that name on the Go object registered
// under the call's _this reference. Its VirtualMachine type has no QueryChangedDiskAreas
// method, and Go cannot add one to a type of another package; wrapping the VM objects
// breaks vcsim's own type assertions. So the launcher's /sdk front (router) points these
// calls at a cbtEndpoint registered under the same value with type endpointType, and vcsim
// does the rest as for any call: session check, locking, fault and response encoding.

package main

import (
	"bytes"
	"io"
	"net/http"
	"regexp"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// endpointType is the managed object type of the endpoints; it only appears in
// NotAuthenticated faults for unauthenticated QueryChangedDiskAreas calls.
const endpointType = "VcsimFerryVirtualMachine"

// Fault message keys ESXi puts in FileFault.faultMessage for change tracking errors.
const (
	keyNoTrack          = "vim.hostd.vmsvc.cbt.noTrack"
	keyCannotGetChanges = "vim.hostd.vmsvc.cbt.cannotGetChanges"
)

var (
	thisElement = regexp.MustCompile(`<(?:[A-Za-z_][\w.-]*:)?_this\b[^>]*>`)
	vmTypeAttr  = regexp.MustCompile(`\btype\s*=\s*("|')VirtualMachine("|')`)
)

// router is the /sdk handler: it passes every request to vcsim, after pointing
// QueryChangedDiskAreas calls on existing VMs at their endpoint.
type router struct {
	service *simulator.Service
	tracker *tracker
}

func (r *router) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	body, err := io.ReadAll(req.Body)
	_ = req.Body.Close()
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	redirected := false
	if bytes.Contains(body, []byte("QueryChangedDiskAreas")) {
		rewritten := r.redirect(body)
		redirected = !bytes.Equal(rewritten, body)
		body = rewritten
	}
	req.Body = io.NopCloser(bytes.NewReader(body))
	req.ContentLength = int64(len(body))
	if !redirected {
		r.service.ServeSDK(w, req)
		return
	}
	// A fault about the redirected call (e.g. NotAuthenticated after a session expired) names the
	// endpoint's type, which clients cannot decode: give them back the VirtualMachine they called.
	captured := &capture{header: w.Header(), status: http.StatusOK}
	r.service.ServeSDK(captured, req)
	out := bytes.ReplaceAll(captured.body.Bytes(), []byte(`"`+endpointType+`"`), []byte(`"VirtualMachine"`))
	w.Header().Del("Content-Length")
	w.WriteHeader(captured.status)
	_, _ = w.Write(out)
}

// capture buffers a response so it can be corrected before it is sent.
type capture struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (c *capture) Header() http.Header         { return c.header }
func (c *capture) WriteHeader(status int)      { c.status = status }
func (c *capture) Write(b []byte) (int, error) { return c.body.Write(b) }

// redirect rewrites `<_this type="VirtualMachine">vm-N</_this>` to the endpoint type.
// Anything else (another method, a VM that does not exist, a body vcsim cannot decode)
// goes to vcsim unchanged, which answers it as it always does.
func (r *router) redirect(body []byte) []byte {
	method, err := simulator.UnmarshalBody(types.TypeFunc(), body)
	if err != nil || method.Name != "QueryChangedDiskAreas" || method.This.Type != "VirtualMachine" {
		return body
	}
	if simulator.Map.Get(method.This) == nil {
		return body
	}
	loc := thisElement.FindIndex(body)
	if loc == nil {
		return body
	}
	r.ensureEndpoint(method.This.Value)
	element := vmTypeAttr.ReplaceAll(body[loc[0]:loc[1]], []byte("type=${1}"+endpointType+"${2}"))
	rewritten := make([]byte, 0, len(body)+len(endpointType))
	rewritten = append(rewritten, body[:loc[0]]...)
	rewritten = append(rewritten, element...)
	return append(rewritten, body[loc[1]:]...)
}

func (r *router) ensureEndpoint(vm string) {
	ref := endpointRef(vm)
	if simulator.Map.Get(ref) == nil {
		simulator.Map.Put(&cbtEndpoint{self: ref, tracker: r.tracker})
	}
}

func endpointRef(vm string) types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: endpointType, Value: vm}
}

// cbtEndpoint answers QueryChangedDiskAreas for the VM with the same reference value.
//
// vcsim walks every registered object in some calls (SearchIndex.FindByUuid among them) and
// digs out each object's embedded managed-object type, panicking for an object without one;
// the embedded ExtensibleManagedObject gives it one that no VM lookup mistakes for a VM.
type cbtEndpoint struct {
	mo.ExtensibleManagedObject
	self    types.ManagedObjectReference
	tracker *tracker
}

func (e *cbtEndpoint) Reference() types.ManagedObjectReference { return e.self }

// QueryChangedDiskAreas is called by vcsim's dispatcher (by name, via reflection).
func (e *cbtEndpoint) QueryChangedDiskAreas(req *types.QueryChangedDiskAreas) soap.HasFault {
	body := new(methods.QueryChangedDiskAreasBody)
	ref := types.ManagedObjectReference{Type: "VirtualMachine", Value: req.This.Value}
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		body.Fault_ = simulator.Fault("", &types.ManagedObjectNotFound{Obj: ref})
		return body
	}
	var info types.DiskChangeInfo
	var fault *soap.Fault
	simulator.Map.WithLock(vm, func() { info, fault = e.tracker.query(vm, req) })
	if fault != nil {
		body.Fault_ = fault
	} else {
		body.Res = &types.QueryChangedDiskAreasResponse{Returnval: info}
	}
	return body
}

// query computes one page of changed areas; the caller holds the VM's lock. The checks
// and their faults follow ESXi: InvalidArgument for a bad deviceKey, startOffset or
// malformed changeId; FileFault "Error caused by file <disk>" with a cbt message key
// when CBT is off or the changeId is not part of the disk's current epoch.
func (t *tracker) query(vm *simulator.VirtualMachine, req *types.QueryChangedDiskAreas) (types.DiskChangeInfo, *soap.Fault) {
	var none types.DiskChangeInfo
	disk := findDisk(vm.Config.Hardware.Device, req.DeviceKey)
	if disk == nil {
		return none, invalidArgument("deviceKey")
	}
	capacity := diskCapacity(disk)
	if req.StartOffset < 0 || req.StartOffset >= capacity {
		return none, invalidArgument("startOffset")
	}
	if _, _, ok := parseChangeID(req.ChangeId); !ok && req.ChangeId != anyChangeID {
		return none, invalidArgument("changeId")
	}
	descriptor, err := descriptorFile(vm, flatBacking(disk))
	if err != nil {
		return none, simulator.Fault(err.Error(), &types.InvalidDatastorePath{DatastorePath: flatBacking(disk).FileName})
	}
	if t.syncEnabled(vm) == nil { // also starts tracking for a VM created with CBT on
		return none, fileFault(descriptor, keyNoTrack, "Change tracking is not enabled for this disk")
	}

	target, fault := t.targetDigests(vm, req, descriptor, capacity)
	if fault != nil {
		return none, fault
	}
	var base blockDigests // nil for "*": every non-zero block counts as changed
	if req.ChangeId != anyChangeID {
		var known bool
		if base, known = t.lookup(vm.Self, req.DeviceKey, req.ChangeId); !known {
			return none, fileFault(descriptor, keyCannotGetChanges,
				"changeId "+req.ChangeId+" does not belong to the disk's current change tracking epoch")
		}
	}

	extents := mergeBlocks(changedBlocks(base, target), capacity, t.blockSize)
	covered, inside := page(extents, req.StartOffset, capacity, t.pageSpan, t.pageExtent)
	info := types.DiskChangeInfo{StartOffset: req.StartOffset, Length: covered}
	for _, e := range inside {
		info.ChangedArea = append(info.ChangedArea, types.DiskChangeExtent{Start: e.start, Length: e.length})
	}
	return info, nil
}

// targetDigests returns the digests at the requested snapshot, or of the disk's current
// contents when no snapshot is given (vSphere allows that for powered-off VMs only).
func (t *tracker) targetDigests(vm *simulator.VirtualMachine, req *types.QueryChangedDiskAreas,
	descriptor string, capacity int64) (blockDigests, *soap.Fault) {
	if req.Snapshot == nil {
		if vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOff {
			return nil, simulator.Fault("", &types.InvalidPowerState{
				RequestedState: types.VirtualMachinePowerStatePoweredOff,
				ExistingState:  vm.Runtime.PowerState,
			})
		}
		digests, err := digestFile(flatFile(descriptor), capacity, t.blockSize)
		if err != nil {
			return nil, fileFault(descriptor, keyCannotGetChanges, err.Error())
		}
		return digests, nil
	}

	snapshot, ok := simulator.Map.Get(*req.Snapshot).(*simulator.VirtualMachineSnapshot)
	if !ok {
		return nil, simulator.Fault("", &types.ManagedObjectNotFound{Obj: *req.Snapshot})
	}
	if snapshot.Vm != vm.Self {
		return nil, invalidArgument("snapshot")
	}
	disk := findDisk(snapshot.Config.Hardware.Device, req.DeviceKey)
	if disk == nil {
		return nil, invalidArgument("deviceKey")
	}
	changeID := flatBacking(disk).ChangeId
	if changeID == "" {
		return nil, fileFault(descriptor, keyNoTrack, "The snapshot was taken while change tracking was off")
	}
	digests, known := t.lookup(vm.Self, req.DeviceKey, changeID)
	if !known {
		return nil, fileFault(descriptor, keyCannotGetChanges,
			"The snapshot's changeId "+changeID+" does not belong to the disk's current change tracking epoch")
	}
	return digests, nil
}

// findDisk returns the disk with a FlatVer2 backing that has the given key.
func findDisk(devices []types.BaseVirtualDevice, key int32) *types.VirtualDisk {
	for _, device := range devices {
		if disk, ok := device.(*types.VirtualDisk); ok && disk.Key == key && flatBacking(disk) != nil {
			return disk
		}
	}
	return nil
}

func invalidArgument(property string) *soap.Fault {
	return simulator.Fault("A specified parameter was not correct: "+property,
		&types.InvalidArgument{InvalidProperty: property})
}

func fileFault(file, key, message string) *soap.Fault {
	return simulator.Fault("Error caused by file "+file, &types.FileFault{
		VimFault: types.VimFault{MethodFault: types.MethodFault{
			FaultMessage: []types.LocalizableMessage{{Key: key, Message: message}},
		}},
		File: file,
	})
}
