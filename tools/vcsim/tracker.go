// Change tracking state and the simulator hooks that maintain it.
//
// The tracker is registered with simulator.Map.AddHandler, so the registry calls it
// whenever an object is added, changed or removed:
//   - a VirtualMachineSnapshot is added (inside CreateSnapshot_Task, while the task holds
//     the VM's lock): every disk of a VM with CBT on gets a new changeId and the digests
//     of its backing file are kept under it;
//   - a task on a VirtualMachine finishes (ReconfigVM_Task above all): the VM's
//     config.changeTrackingEnabled is read; when it went off, the VM's epochs and
//     digests are dropped, so the next snapshot after re-enabling starts a new epoch;
//   - a VirtualMachine is removed: its state and its endpoint (query.go) are dropped.

package main

import (
	"fmt"
	"log"
	"path/filepath"
	"strings"
	"sync"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// diskTracking is the change history of one disk within its current epoch.
type diskTracking struct {
	file     string // backing file name; another file under the same key restarts tracking
	epoch    string
	sequence int
	history  map[string]blockDigests // changeId -> digests of the disk at that changeId
}

// vmTracking exists while a VM has CBT enabled (as far as the tracker has seen).
type vmTracking struct {
	disks map[int32]*diskTracking
}

type tracker struct {
	blockSize  int64
	pageSpan   int64
	pageExtent int

	mu  sync.Mutex
	vms map[types.ManagedObjectReference]*vmTracking
}

func newTracker(blockSize, pageSpan int64, pageExtents int) *tracker {
	return &tracker{
		blockSize:  blockSize,
		pageSpan:   pageSpan,
		pageExtent: pageExtents,
		vms:        make(map[types.ManagedObjectReference]*vmTracking),
	}
}

// Reference names the tracker in the registry's handler table (it is not an object).
func (t *tracker) Reference() types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "VcsimFerryTracker", Value: "cbt"}
}

// PutObject assigns changeIds when a snapshot is created.
func (t *tracker) PutObject(obj mo.Reference) {
	snapshot, ok := obj.(*simulator.VirtualMachineSnapshot)
	if !ok {
		return
	}
	vm, ok := simulator.Map.Get(snapshot.Vm).(*simulator.VirtualMachine)
	if !ok {
		return
	}
	t.recordSnapshot(vm, snapshot)
}

// UpdateObject follows config.changeTrackingEnabled when a task on a VM finishes.
func (t *tracker) UpdateObject(obj mo.Reference, changes []types.PropertyChange) {
	task, ok := obj.(*mo.Task)
	if !ok || task.Info.Entity == nil || task.Info.Entity.Type != "VirtualMachine" || !finished(changes) {
		return
	}
	if vm, ok := simulator.Map.Get(*task.Info.Entity).(*simulator.VirtualMachine); ok {
		t.syncEnabled(vm)
	}
}

// RemoveObject forgets a destroyed VM.
func (t *tracker) RemoveObject(ref types.ManagedObjectReference) {
	if ref.Type != "VirtualMachine" {
		return
	}
	t.mu.Lock()
	delete(t.vms, ref)
	t.mu.Unlock()
	simulator.Map.Remove(endpointRef(ref.Value))
}

func finished(changes []types.PropertyChange) bool {
	for _, c := range changes {
		if c.Name == "info.state" {
			state, _ := c.Val.(types.TaskInfoState)
			return state == types.TaskInfoStateSuccess || state == types.TaskInfoStateError
		}
	}
	return false
}

// syncEnabled starts or ends tracking to match the VM's flag; the caller holds the VM's
// lock (task hooks run inside the task's method call).
func (t *tracker) syncEnabled(vm *simulator.VirtualMachine) *vmTracking {
	t.mu.Lock()
	defer t.mu.Unlock()
	state := t.vms[vm.Self]
	enabled := vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
	switch {
	case enabled && state == nil:
		state = &vmTracking{disks: make(map[int32]*diskTracking)}
		t.vms[vm.Self] = state
	case !enabled && state != nil:
		delete(t.vms, vm.Self)
		state = nil
		clearChangeIDs(vm)
	}
	return state
}

// clearChangeIDs removes the changeIds from the VM's current disks, as vSphere does when
// CBT is turned off; snapshots keep theirs.
func clearChangeIDs(vm *simulator.VirtualMachine) {
	for _, device := range vm.Config.Hardware.Device {
		if backing := flatBacking(device); backing != nil {
			backing.ChangeId = ""
		}
	}
	publishDevices(vm)
}

// publishDevices tells property collectors (WaitForUpdatesEx on "config") about changed
// disk backings, the way vcsim's own ReconfigVM_Task does.
func publishDevices(vm *simulator.VirtualMachine) {
	simulator.Map.Update(vm, []types.PropertyChange{
		{Name: "config.hardware.device", Val: vm.Config.Hardware.Device},
	})
}

// recordSnapshot runs inside CreateSnapshot_Task with the VM locked. The snapshot's
// config is vcsim's shallow copy of the VM's config, so its disks are first copied:
// later changes to the VM's disks must not show through the snapshot.
func (t *tracker) recordSnapshot(vm *simulator.VirtualMachine, snapshot *simulator.VirtualMachineSnapshot) {
	state := t.syncEnabled(vm)
	devices := make([]types.BaseVirtualDevice, len(vm.Config.Hardware.Device))
	for i, device := range vm.Config.Hardware.Device {
		if state != nil {
			if disk, ok := device.(*types.VirtualDisk); ok {
				t.advance(vm, state, disk)
			}
		}
		devices[i] = copyDisk(device)
	}
	snapshot.Config.Hardware.Device = devices
	if state != nil {
		publishDevices(vm)
	}
}

// advance gives one disk the next changeId of its epoch and keeps the digests of its
// backing file under it. A disk whose file cannot be read keeps no changeId (logged).
func (t *tracker) advance(vm *simulator.VirtualMachine, state *vmTracking, disk *types.VirtualDisk) {
	backing := flatBacking(disk)
	if backing == nil {
		return
	}
	path, err := dataFile(vm, backing)
	if err == nil {
		var digests blockDigests
		digests, err = digestFile(path, diskCapacity(disk), t.blockSize)
		if err == nil {
			t.mu.Lock()
			track := state.disk(disk.Key, backing.FileName)
			track.sequence++
			id := formatChangeID(track.epoch, track.sequence)
			track.history[id] = digests
			t.mu.Unlock()
			backing.ChangeId = id
			return
		}
	}
	log.Printf("cbt: %s disk %d: no changeId: %v", vm.Self.Value, disk.Key, err)
	backing.ChangeId = ""
}

// disk returns the tracking of one disk, starting a new epoch for a new disk or file.
func (s *vmTracking) disk(key int32, file string) *diskTracking {
	track := s.disks[key]
	if track == nil || track.file != file {
		track = &diskTracking{file: file, epoch: newEpoch(), history: make(map[string]blockDigests)}
		s.disks[key] = track
	}
	return track
}

// lookup returns the digests recorded under changeId for a disk, if any.
func (t *tracker) lookup(vm types.ManagedObjectReference, key int32, changeID string) (blockDigests, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	state := t.vms[vm]
	if state == nil || state.disks[key] == nil {
		return nil, false
	}
	digests, ok := state.disks[key].history[changeID]
	return digests, ok
}

// copyDisk copies a disk device and its flat backing; other devices are shared.
func copyDisk(device types.BaseVirtualDevice) types.BaseVirtualDevice {
	disk, ok := device.(*types.VirtualDisk)
	if !ok {
		return device
	}
	diskCopy := *disk
	if backing := flatBacking(disk); backing != nil {
		backingCopy := *backing
		diskCopy.Backing = &backingCopy
	}
	return &diskCopy
}

// flatBacking returns a disk's FlatVer2 backing, the only kind the tracker handles
// (vcsim creates every disk with it).
func flatBacking(device types.BaseVirtualDevice) *types.VirtualDiskFlatVer2BackingInfo {
	disk, ok := device.(*types.VirtualDisk)
	if !ok {
		return nil
	}
	backing, _ := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
	return backing
}

func diskCapacity(disk *types.VirtualDisk) int64 {
	if disk.CapacityInBytes > 0 {
		return disk.CapacityInBytes
	}
	return disk.CapacityInKB * 1024
}

// descriptorFile maps a disk's "[datastore] dir/name.vmdk" to the local path of that
// file in the datastore's folder (vcsim leaves the descriptor empty).
func descriptorFile(vm *simulator.VirtualMachine, backing *types.VirtualDiskFlatVer2BackingInfo) (string, error) {
	var p object.DatastorePath
	if !p.FromString(backing.FileName) {
		return "", fmt.Errorf("invalid datastore path %q", backing.FileName)
	}
	var ds *simulator.Datastore
	if backing.Datastore != nil {
		ds, _ = simulator.Map.Get(*backing.Datastore).(*simulator.Datastore)
	}
	if ds == nil {
		ds, _ = simulator.Map.FindByName(p.Datastore, vm.Datastore).(*simulator.Datastore)
	}
	if ds == nil {
		return "", fmt.Errorf("no datastore %q", p.Datastore)
	}
	return filepath.Join(ds.Info.GetDatastoreInfo().Url, p.Path), nil
}

// flatFile names the file holding a disk's bytes: "name-flat.vmdk" next to the
// descriptor, the file vcsim creates with the disk and requires when a disk is attached
// without fileOperation. vcsim replaces the first ".vmdk"; so does this.
func flatFile(descriptor string) string {
	return strings.Replace(descriptor, ".vmdk", "-flat.vmdk", 1)
}

// dataFile is flatFile(descriptorFile(...)).
func dataFile(vm *simulator.VirtualMachine, backing *types.VirtualDiskFlatVer2BackingInfo) (string, error) {
	descriptor, err := descriptorFile(vm, backing)
	if err != nil {
		return "", err
	}
	return flatFile(descriptor), nil
}
